//! The `tokenizer.*` metadata of an exported GGUF.
//!
//! - From a GGUF source: its `tokenizer.*` keys, copied as they are.
//! - From an HF directory with a byte-level BPE `tokenizer.json`: what llama.cpp's
//!   `convert_hf_to_gguf.py` writes (`TextModel._set_vocab_gpt2`, `get_vocab_base`,
//!   `does_token_look_special`, and gguf-py's `SpecialVocab` in `gguf/vocab.py`): model `gpt2`,
//!   the tokens by id (missing ids as `[PADn]`, type unused), token types (added tokens control
//!   when special or special-looking, else user-defined; the rest normal), the merges, the
//!   special ids from tokenizer_config.json's `*_token` (matched against the added tokens)
//!   then config.json's `*_token_id`, `add_bos/eos/sep_token` from the post-processor template
//!   then tokenizer_config.json, and the chat template. Deviation: `tokenizer.ggml.pre` comes
//!   from the pre-tokenizer's shape (`kaizen_data::tokenizer::llama_cpp_pre_name`), not from
//!   the converter's table of hashes of published tokenizers.
//!
//! SentencePiece directories (`tokenizer.model` / `spiece.model` without tokenizer.json) are
//! refused with an error for now.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{Map, Value as Json};

use crate::{Error, Result};

type Meta = Vec<(String, Value)>;

/// The `tokenizer.*` key/values for a model read from `source` with `n_vocab` embedding rows.
pub(crate) fn tokenizer_metadata(source: &Path, n_vocab: usize) -> Result<Meta> {
    if source.is_dir() {
        from_hf_dir(source, n_vocab)
    } else {
        from_gguf(source)
    }
}

/// gguf-py's key order: model, pre, tokens, scores, types, merges, ids, add_*, template.
const ORDER: &[&str] = &[
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.seperator_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.cls_token_id",
    "tokenizer.ggml.mask_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_sep_token",
    "tokenizer.chat_template",
];

fn from_gguf(path: &Path) -> Result<Meta> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut f).map_err(|e| {
        Error::checkpoint(path, format!("cannot read its GGUF metadata again: {e}"))
    })?;
    let mut keys: Vec<&String> = content
        .metadata
        .keys()
        .filter(|k| k.starts_with("tokenizer."))
        .collect();
    let rank = |k: &str| ORDER.iter().position(|o| *o == k).unwrap_or(ORDER.len());
    keys.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    Ok(keys
        .into_iter()
        .map(|k| (k.clone(), content.metadata[k].clone()))
        .collect())
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::checkpoint(path, format!("not valid JSON ({e})")))
}

/// convert_hf_to_gguf.py `TextModel.does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

fn from_hf_dir(dir: &Path, n_vocab: usize) -> Result<Meta> {
    let json_path = dir.join("tokenizer.json");
    let Some(tok) = read_json(&json_path)? else {
        return Err(Error::Input(format!(
            "{}: no tokenizer.json; kaizen exports GGUF tokenizers from a byte-level BPE \
             tokenizer.json only (SentencePiece export is not implemented: convert with \
             llama.cpp's convert_hf_to_gguf.py instead)",
            dir.display()
        )));
    };
    let bad = |m: String| Error::checkpoint(&json_path, m);
    let model = &tok["model"];
    if model["type"].as_str() != Some("BPE") || tok["decoder"]["type"].as_str() != Some("ByteLevel")
    {
        return Err(bad(
            "not a byte-level BPE tokenizer; kaizen exports only those to GGUF (model gpt2)".into(),
        ));
    }
    let pre = kaizen_data::tokenizer::llama_cpp_pre_name(&tok["pre_tokenizer"]).ok_or_else(|| {
        bad("its pre_tokenizer is none that llama.cpp names (gpt-2, smollm, llama-bpe, qwen2, gpt-4o); llama.cpp would tokenize differently".into())
    })?;
    let mut by_id: BTreeMap<usize, (String, i32)> = BTreeMap::new();
    for (text, id) in model["vocab"].as_object().into_iter().flatten() {
        if let Some(id) = id.as_u64() {
            by_id.insert(id as usize, (text.clone(), NORMAL));
        }
    }
    let added = tok["added_tokens"].as_array().cloned().unwrap_or_default();
    for a in &added {
        let (Some(id), Some(text)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        let special = a["special"].as_bool().unwrap_or(false) || looks_special(text);
        let entry = if special {
            (text.to_string(), CONTROL)
        } else {
            (text.replace('\u{2581}', " "), USER_DEFINED)
        };
        by_id.insert(id as usize, entry);
    }
    if let Some((&id, _)) = by_id.range(n_vocab..).next() {
        return Err(bad(format!(
            "token id {id} is outside the model's vocabulary of {n_vocab}"
        )));
    }
    let (mut tokens, mut types) = (Vec::new(), Vec::new());
    for i in 0..n_vocab {
        let (t, ty) = by_id
            .remove(&i)
            .unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED));
        tokens.push(Value::String(t));
        types.push(Value::I32(ty));
    }
    let merges = merges(&model["merges"]).map_err(bad)?;
    let config = read_json(&dir.join("tokenizer_config.json"))?;
    let config = config.as_ref().and_then(Json::as_object);
    let model_config = read_json(&dir.join("config.json"))?;
    let special = SpecialVocab::read(&tok, config, model_config.as_ref(), &added, dir)?;
    let s = |v: &str| Value::String(v.to_string());
    let mut meta: Meta = vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre)),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
    ];
    if !merges.is_empty() {
        let merges = merges.into_iter().map(Value::String).collect();
        meta.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
    }
    meta.extend(special.metadata());
    Ok(meta)
}

/// tokenizer.json merges, either "a b" strings or [a, b] pairs (spaces inside a pair's parts
/// written as U+0120 + 256... as gguf-py: `chr(ord(' ') + 256)`).
fn merges(m: &Json) -> std::result::Result<Vec<String>, String> {
    let Some(list) = m.as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|e| match e {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 => {
                let part = |v: &Json| v.as_str().map(|s| s.replace(' ', "\u{0120}"));
                match (part(&p[0]), part(&p[1])) {
                    (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                    _ => Err("a merge is not a pair of strings".to_string()),
                }
            }
            _ => Err("unknown merges format".to_string()),
        })
        .collect()
}

/// gguf-py `SpecialVocab`: special token ids, add_*_token flags, the chat template.
struct SpecialVocab {
    ids: Vec<(&'static str, u32)>,
    add: Vec<(&'static str, bool)>,
    chat_template: Option<String>,
}

const TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

impl SpecialVocab {
    fn read(
        tok: &Json,
        config: Option<&Map<String, Json>>,
        model_config: Option<&Json>,
        added: &[Json],
        dir: &Path,
    ) -> Result<Self> {
        let mut config = config.cloned();
        let mut sv = SpecialVocab {
            ids: Vec::new(),
            add: Vec::new(),
            chat_template: None,
        };
        let content = token_content;
        if let Some(pp) = tok.get("post_processor").filter(|p| !p.is_null()) {
            sv.read_post_processor(pp, config.as_mut());
        }
        let Some(config) = config else {
            return Ok(sv);
        };
        sv.chat_template = match config.get("chat_template").and_then(Json::as_str) {
            Some(t) => Some(t.to_string()),
            None => chat_template_file(dir)?,
        };
        for typ in TYPES {
            if let Some(b) = config
                .get(&format!("add_{typ}_token"))
                .and_then(Json::as_bool)
            {
                if !sv.add.iter().any(|(t, _)| *t == typ) {
                    sv.add.push((typ, b));
                }
            }
            let Some(text) = content(&config, &format!("{typ}_token")) else {
                continue;
            };
            let id = added
                .iter()
                .find(|a| a["content"].as_str() == Some(text.as_str()))
                .and_then(|a| a["id"].as_u64());
            sv.set(typ, id);
        }
        if let Some(mc) = model_config {
            for typ in TYPES {
                sv.set(
                    typ,
                    mc.get(format!("{typ}_token_id")).and_then(Json::as_u64),
                );
            }
        }
        Ok(sv)
    }

    fn set(&mut self, typ: &'static str, id: Option<u64>) {
        if let Some(id) = id.filter(|&i| i <= u32::MAX as u64) {
            if !self.ids.iter().any(|(t, _)| *t == typ) {
                self.ids.push((typ, id as u32));
            }
        }
    }

    fn set_add(&mut self, typ: &'static str, v: bool) {
        match self.add.iter_mut().find(|(t, _)| *t == typ) {
            Some(e) => e.1 = v,
            None => self.add.push((typ, v)),
        }
    }

    /// gguf-py's "crude parsing of TemplateProcessing" (and ByteLevel / RobertaProcessing).
    fn read_post_processor(&mut self, pp: &Json, mut config: Option<&mut Map<String, Json>>) {
        let get = |c: &Option<&mut Map<String, Json>>, k: &str| {
            c.as_deref().and_then(|c| token_content(c, k))
        };
        let mut bos = get(&config, "bos_token");
        let mut eos = get(&config, "eos_token");
        let cls = get(&config, "cls_token");
        let sep = get(&config, "sep_token");
        if bos.is_none() && cls.is_some() {
            bos = cls.clone();
        }
        if eos.is_none() && sep.is_some() {
            eos = sep.clone();
        }
        let list = match pp.get("processors").and_then(Json::as_array) {
            Some(l) => l.clone(),
            None => vec![pp.clone()],
        };
        for p in list {
            match p["type"].as_str() {
                Some("ByteLevel") => {
                    if !self.add.iter().any(|(t, _)| *t == "bos") {
                        self.add.push(("bos", false));
                    }
                    if !self.add.iter().any(|(t, _)| *t == "eos") {
                        self.add.push(("eos", false));
                    }
                }
                Some("RobertaProcessing") => {
                    self.set_add("bos", true);
                    self.set_add("eos", true);
                    self.set_add("sep", true);
                }
                Some("TemplateProcessing") => {
                    let special = |v: &Json| v["SpecialToken"]["id"].as_str().map(str::to_owned);
                    let single = p["single"].as_array().cloned().unwrap_or_default();
                    let pair = p["pair"].as_array().cloned().unwrap_or_default();
                    let (mut first, mut last) = (None, None);
                    if single.len() > 1 {
                        first = special(&single[0]);
                        if let Some(f) = &first {
                            if config.is_none() {
                                bos = Some(f.clone());
                            }
                            self.set_add("bos", Some(f) == bos.as_ref() || Some(f) == cls.as_ref());
                        }
                        last = special(&single[single.len() - 1]);
                        if let Some(l) = &last {
                            if config.is_none() {
                                eos = Some(l.clone());
                            } else if Some(l) != eos.as_ref() {
                                if let Some(c) = config.as_deref_mut() {
                                    c.insert("eos_token".into(), Json::String(l.clone()));
                                }
                                eos = Some(l.clone());
                            }
                            self.set_add("eos", Some(l) == eos.as_ref());
                        }
                    }
                    if !pair.is_empty() {
                        let start = usize::from(first.is_some() && special(&pair[0]) == first);
                        let stop = if last.is_some() && special(&pair[pair.len() - 1]) == last {
                            pair.len() - 1
                        } else {
                            pair.len()
                        };
                        let inner = pair.get(start..stop).unwrap_or(&[]);
                        let seq = |v: &Json| v["Sequence"]["id"].as_str().map(str::to_owned);
                        if inner.len() > 2
                            && seq(&inner[0]).as_deref() == Some("A")
                            && seq(&inner[inner.len() - 1]).as_deref() == Some("B")
                        {
                            let mid = &inner[1..inner.len() - 1];
                            let is_sep =
                                |t: &Option<String>| t.is_some() && (*t == sep || *t == eos);
                            let mut add_sep = false;
                            if let Some(e) = special(&mid[0]) {
                                add_sep = is_sep(&Some(e)) && last.is_none();
                            }
                            if mid.len() == 2 && is_sep(&special(&mid[1])) {
                                add_sep = true;
                            }
                            self.set_add("sep", add_sep);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn metadata(&self) -> Meta {
        let mut out: Meta = Vec::new();
        for (typ, id) in &self.ids {
            // gguf-py's key for "sep" keeps llama.cpp's spelling.
            let name = match *typ {
                "unk" => "unknown",
                "sep" => "seperator",
                "pad" => "padding",
                t => t,
            };
            out.push((format!("tokenizer.ggml.{name}_token_id"), Value::U32(*id)));
        }
        for (typ, v) in &self.add {
            out.push((format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(*v)));
        }
        if let Some(t) = &self.chat_template {
            out.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
        }
        out
    }
}

/// A tokenizer_config.json `*_token` entry's text: a string or an AddedToken's "content".
fn token_content(c: &Map<String, Json>, key: &str) -> Option<String> {
    match c.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// chat_template.jinja, else chat_template.json's "chat_template", beside tokenizer_config.json.
fn chat_template_file(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::io(&jinja, e));
    }
    Ok(read_json(&dir.join("chat_template.json"))?
        .and_then(|j| j["chat_template"].as_str().map(str::to_owned)))
}
