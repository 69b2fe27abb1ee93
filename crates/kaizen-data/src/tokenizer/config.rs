//! The parts of an HF model directory's `tokenizer_config.json` (and its neighbours
//! `special_tokens_map.json`, `chat_template.jinja`, `chat_template.json`) that tokenizing needs.

use std::path::Path;

use serde_json::{Map, Value};

use super::Tokenizer;
use crate::error::{Error, Result};
use crate::guard::quote;

/// A token added by `added_tokens_decoder`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ConfigAddedToken {
    pub id: u32,
    pub token: tokenizers::AddedToken,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
    /// Why `chat_template` is `None` although the files mention one.
    pub chat_template_note: Option<String>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub added_tokens: Vec<ConfigAddedToken>,
}

impl TokenizerConfig {
    /// Reads whatever of the four files exists in `dir`; none of them is required.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = read_object(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let special = read_object(&dir.join("special_tokens_map.json"))?.unwrap_or_default();
        let path = dir.join("tokenizer_config.json");
        let token = |key: &str| -> Result<Option<String>> {
            match config.get(key) {
                Some(v) => token_content(&path, key, v),
                None => match special.get(key) {
                    Some(v) => token_content(&dir.join("special_tokens_map.json"), key, v),
                    None => Ok(None),
                },
            }
        };
        let mut out = TokenizerConfig {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            add_bos_token: flag(&path, &config, "add_bos_token")?,
            add_eos_token: flag(&path, &config, "add_eos_token")?,
            added_tokens: added_tokens(&path, &config)?,
            ..Default::default()
        };
        out.read_chat_template(dir, &config)?;
        Ok(out)
    }

    /// `chat_template.jinja`, else `chat_template.json`, else `tokenizer_config.json`'s field
    /// (a string, or a list of `{name, template}` from which "default" is taken).
    fn read_chat_template(&mut self, dir: &Path, config: &Map<String, Value>) -> Result<()> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            self.chat_template = Some(text);
            return Ok(());
        }
        let json = dir.join("chat_template.json");
        if let Some(obj) = read_object(&json)? {
            return self.template_from_value(&json, obj.get("chat_template"));
        }
        self.template_from_value(
            &dir.join("tokenizer_config.json"),
            config.get("chat_template"),
        )
    }

    fn template_from_value(&mut self, path: &Path, value: Option<&Value>) -> Result<()> {
        match value {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => self.chat_template = Some(s.clone()),
            Some(Value::Array(list)) => {
                let mut names = Vec::new();
                for entry in list {
                    let name = entry.get("name").and_then(Value::as_str).unwrap_or("");
                    let template = entry.get("template").and_then(Value::as_str);
                    match (name, template) {
                        ("default", Some(t)) => {
                            self.chat_template = Some(t.to_string());
                            return Ok(());
                        }
                        (n, Some(_)) => names.push(n.to_string()),
                        _ => {
                            return Err(Error::bad_file(
                                path,
                                "chat_template is a list, but an entry lacks {\"name\": ..., \
                                 \"template\": \"...\"}",
                            ))
                        }
                    }
                }
                self.chat_template_note = Some(format!(
                    "{} lists chat templates named [{}] but none named \"default\"; add one",
                    path.display(),
                    names.join(", ")
                ));
            }
            Some(_) => {
                return Err(Error::bad_file(
                    path,
                    "chat_template must be a string or a list of {\"name\", \"template\"} objects",
                ))
            }
        }
        Ok(())
    }
}

impl Tokenizer {
    /// What tokenizer_config.json (and friends) add on top of the tokenizer file.
    pub(super) fn apply_config(&mut self, config: TokenizerConfig, path: &Path) -> Result<()> {
        self.source = path.parent().unwrap_or(path).display().to_string();
        self.add_config_tokens(&config.added_tokens, path)?;
        if config.bos_token.is_some() {
            self.bos_token = config.bos_token;
        }
        if config.eos_token.is_some() {
            self.eos_token = config.eos_token;
        }
        for (name, token) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ] {
            if let Some(t) = token.as_deref().filter(|t| self.token_to_id(t).is_none()) {
                return Err(Error::bad_file(
                    path,
                    format!("{name} {} is not in the tokenizer's vocabulary", quote(t)),
                ));
            }
        }
        self.chat_template = config.chat_template.or(self.chat_template.take());
        self.chat_template_note = config.chat_template_note;
        self.vocab_size = self.inner.get_vocab_size(true);
        // transformers v5: explicit add_bos_token/add_eos_token rebuild the post-processor.
        if config.add_bos_token.is_some() || config.add_eos_token.is_some() {
            let add_bos = config.add_bos_token.unwrap_or(false);
            let add_eos = config.add_eos_token.unwrap_or(false);
            self.set_special_tokens_template(add_bos, add_eos)?;
        }
        Ok(())
    }

    /// Adds `added_tokens_decoder`'s tokens the tokenizer lacks, in id order and in one call
    /// (each call rebuilds the added-token matcher over every added token, so one call per token
    /// took time in the square of their number), then checks that each has its stated id.
    fn add_config_tokens(&mut self, added: &[ConfigAddedToken], path: &Path) -> Result<()> {
        let before: Vec<Option<u32>> = added
            .iter()
            .map(|a| self.inner.token_to_id(&a.token.content))
            .collect();
        let known = self.inner.get_added_vocabulary().get_vocab();
        let mut seen = std::collections::HashSet::new();
        let new: Vec<tokenizers::AddedToken> = added
            .iter()
            .filter(|a| !known.contains_key(&a.token.content) && seen.insert(&a.token.content))
            .map(|a| a.token.clone())
            .collect();
        if !new.is_empty() {
            self.inner.add_tokens(&new);
        }
        for (a, before) in added.iter().zip(before) {
            let content = &a.token.content;
            let got = before.or_else(|| self.inner.token_to_id(content));
            if got != Some(a.id) {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "added_tokens_decoder says {} is id {}, but the tokenizer gives it \
                         id {}; the tokenizer files do not belong together",
                        quote(content),
                        a.id,
                        got.map_or("none".to_string(), |g| g.to_string())
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn read_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(Error::bad_file(
            path,
            "expected a JSON object at the top level",
        )),
        Err(e) => Err(Error::bad_file(path, format!("not valid JSON: {e}"))),
    }
}

/// A special token given as `"<s>"` or as `{"content": "<s>", ...}`.
fn token_content(path: &Path, key: &str, v: &Value) -> Result<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(o) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::bad_file(
                path,
                format!("{key} is an object without a string \"content\""),
            )),
        },
        _ => Err(Error::bad_file(
            path,
            format!("{key} must be a string or {{\"content\": \"...\"}}"),
        )),
    }
}

fn flag(path: &Path, config: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(Error::bad_file(
            path,
            format!("{key} must be true or false"),
        )),
    }
}

fn added_tokens(path: &Path, config: &Map<String, Value>) -> Result<Vec<ConfigAddedToken>> {
    let Some(Value::Object(map)) = config.get("added_tokens_decoder") else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(map.len());
    for (id, entry) in map {
        let bad = |what: &str| {
            Error::bad_file(path, format!("added_tokens_decoder[{}]: {what}", quote(id)))
        };
        let id: u32 = id.parse().map_err(|_| bad("the key must be a token id"))?;
        let content = entry
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no string \"content\""))?;
        super::validate::check_added_token(
            &path.display().to_string(),
            &format!("added_tokens_decoder[{id}]"),
            content,
        )?;
        let get = |k: &str, default: bool| entry.get(k).and_then(Value::as_bool).unwrap_or(default);
        let special = get("special", false);
        let mut token = tokenizers::AddedToken::from(content, special);
        token.single_word = get("single_word", false);
        token.lstrip = get("lstrip", false);
        token.rstrip = get("rstrip", false);
        token.normalized = get("normalized", !special);
        out.push(ConfigAddedToken { id, token });
    }
    out.sort_by_key(|t| t.id);
    Ok(out)
}
