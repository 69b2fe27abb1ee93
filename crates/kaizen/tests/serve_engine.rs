//! The serving engine without HTTP: rows of every adapter method decoded together in one batch
//! (joining and leaving between steps) give exactly the ids `generate` gives each request alone
//! with that adapter attached; hot load/unload, abandoned rows, timeouts and bad requests.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use kaizen::generate::{generate, GenerateConfig};
use kaizen::serve::{Command, Engine, EngineConfig, EngineHandle, ErrorKind, Event, Request};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const MODEL: &str = "tests/fixtures/models/llama-gqa-tied";

/// Every method kaizen loads, on the same tiny Llama.
const ADAPTERS: [(&str, &str); 13] = [
    ("lora", "tests/fixtures/lora/llama-gqa-tied/adapter"),
    ("dora", "tests/fixtures/lora/dora-llama-gqa-tied/adapter"),
    ("ia3", "tests/fixtures/peft/ia3/llama-gqa-tied/adapter"),
    ("vera", "tests/fixtures/peft/vera/llama-gqa-tied/adapter"),
    ("loha", "tests/fixtures/peft/loha/llama-gqa-tied/adapter"),
    (
        "lokr",
        "tests/fixtures/peft/lokr/llama-gqa-tied-both/adapter",
    ),
    (
        "bottleneck",
        "tests/fixtures/bottleneck/llama-gqa-tied/adapter",
    ),
    (
        "prompt",
        "tests/fixtures/peft/prompt_tuning/llama-gqa-tied/adapter",
    ),
    (
        "prefix",
        "tests/fixtures/peft/prefix_tuning/llama-gqa-tied/adapter",
    ),
    (
        "p-tuning",
        "tests/fixtures/peft/p_tuning/llama-gqa-tied/adapter",
    ),
    // PEFT's trained AdaLoRA adapter: each layer at the rank its rank_pattern keeps
    (
        "adalora",
        "tests/fixtures/peft/adalora/llama-gqa-tied/trained",
    ),
    ("oft", "tests/fixtures/peft/oft/llama-gqa-tied/adapter"),
    ("boft", "tests/fixtures/peft/boft/llama-gqa-tied/adapter"),
];

fn start(max_rows: usize) -> EngineHandle {
    let m = kaizen::load(&root().join(MODEL)).unwrap();
    let cfg = EngineConfig {
        max_rows,
        threads: Some(2),
    };
    let (h, _thread) = Engine::spawn(m.model, m.tokenizer, cfg, 64).unwrap();
    for (name, dir) in ADAPTERS {
        load(&h, name, &root().join(dir)).unwrap();
    }
    h
}

fn load(h: &EngineHandle, name: &str, dir: &std::path::Path) -> kaizen::Result<()> {
    let (tx, rx) = channel();
    let c = Command::Load {
        name: name.into(),
        dir: dir.into(),
        reply: Box::new(move |r| tx.send(r).unwrap()),
    };
    assert!(h.send(c));
    rx.recv().unwrap()
}

fn submit(
    h: &EngineHandle,
    adapter: Option<&str>,
    prompt: Vec<u32>,
    cfg: GenerateConfig,
) -> Receiver<Event> {
    let (tx, rx) = channel();
    let r = Request {
        adapter: adapter.map(str::to_string),
        prompt,
        cfg,
        logprobs: None,
        deadline: None,
        sink: Box::new(move |e| tx.send(e).is_ok()),
    };
    assert!(h.send(Command::Generate(r)));
    rx
}

/// The ids of a finished request, or its error.
fn collect(rx: Receiver<Event>) -> Result<Vec<u32>, (ErrorKind, String)> {
    let mut ids = vec![];
    for e in rx.iter() {
        match e {
            Event::Token { id, .. } => ids.push(id),
            Event::Done { generation, .. } => {
                assert_eq!(generation.ids, ids, "Done lists the streamed ids");
                return Ok(ids);
            }
            Event::Error { kind, message } => return Err((kind, message)),
        }
    }
    panic!("the engine dropped a request without Done or Error")
}

/// `generate` on a model with only this adapter attached.
fn alone(adapter: Option<&str>, prompt: &[u32], cfg: &GenerateConfig) -> Vec<u32> {
    let mut m = kaizen::load(&root().join(MODEL)).unwrap();
    if let Some(name) = adapter {
        let dir = ADAPTERS.iter().find(|(n, _)| *n == name).unwrap().1;
        kaizen::tuners::load_adapter(&mut m.model, &root().join(dir)).unwrap();
    }
    generate(&m.model, &m.tokenizer, prompt, cfg, &mut |_| {})
        .unwrap()
        .ids
}

fn greedy(max_new_tokens: usize) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens,
        greedy: true,
        ..GenerateConfig::default()
    }
}

#[test]
fn batched_rows_of_every_method_equal_generate_alone() {
    // 22 requests, at most 6 rows at once: rows leave at different lengths and waiting ones
    // join between steps.
    let h = start(6);
    let names: Vec<Option<&str>> = std::iter::once(None)
        .chain(ADAPTERS.iter().map(|(n, _)| Some(*n)))
        .collect();
    let mut jobs = vec![];
    for (i, name) in names.iter().enumerate() {
        for (j, len) in [3usize, 11].into_iter().enumerate() {
            let prompt: Vec<u32> = (0..len as u32)
                .map(|t| (t * 37 + i as u32 * 11 + 5) % 590 + 3)
                .collect();
            let cfg = greedy(6 + 5 * j + i);
            let rx = submit(&h, *name, prompt.clone(), cfg.clone());
            jobs.push((*name, prompt, cfg, rx));
        }
    }
    for (name, prompt, cfg, rx) in jobs {
        let got = collect(rx).unwrap();
        assert_eq!(
            got,
            alone(name, &prompt, &cfg),
            "adapter {name:?}, prompt {prompt:?}"
        );
    }
    let s = &h.stats;
    let steps = kaizen::serve::Stats::get(&s.decode_steps);
    let rows = kaizen::serve::Stats::get(&s.decode_rows);
    assert!(
        rows > 2 * steps,
        "rows were batched: {rows} rows in {steps} steps"
    );
}

#[test]
fn sampled_rows_equal_generate_with_the_same_seed() {
    let h = start(8);
    let cfg = |seed| GenerateConfig {
        max_new_tokens: 12,
        temperature: 0.8,
        top_k: Some(50),
        top_p: Some(0.95),
        seed,
        ..GenerateConfig::default()
    };
    let prompt: Vec<u32> = vec![5, 17, 9, 40, 100];
    let jobs: Vec<_> = [
        (None, 1),
        (Some("lora"), 2),
        (Some("prefix"), 3),
        (Some("lora"), 4),
    ]
    .into_iter()
    .map(|(a, seed)| (a, seed, submit(&h, a, prompt.clone(), cfg(seed))))
    .collect();
    for (a, seed, rx) in jobs {
        assert_eq!(collect(rx).unwrap(), alone(a, &prompt, &cfg(seed)), "{a:?}");
    }
}

#[test]
fn adapters_load_and_unload_without_restart() {
    let h = start(4);
    assert_eq!(h.adapters().len(), ADAPTERS.len());
    assert_eq!(h.adapters()[1].method, "LORA (DoRA)");
    let (tx, rx) = channel();
    let c = Command::Unload {
        name: "lora".into(),
        reply: Box::new(move |r| tx.send(r).unwrap()),
    };
    assert!(h.send(c));
    rx.recv().unwrap().unwrap();
    let err = collect(submit(&h, Some("lora"), vec![5, 6], greedy(3))).unwrap_err();
    assert_eq!(err.0, ErrorKind::NotFound);
    // Loaded twice under one name: refused; a bad directory leaves the others working.
    let dir = root().join(ADAPTERS[1].1);
    assert!(load(&h, "dora", &dir).is_err());
    assert!(load(&h, "broken", &root().join("tests/fixtures")).is_err());
    // LN tuning replaces the norms every row shares: refused, with the way out, base untouched.
    let ln = root().join("tests/fixtures/peft/ln_tuning/llama-gqa-tied/adapter");
    let err = load(&h, "ln", &ln).unwrap_err().to_string();
    assert!(err.contains("kaizen merge"), "{err}");
    load(&h, "lora", &root().join(ADAPTERS[0].1)).unwrap();
    let prompt = vec![5, 17, 9];
    for a in [Some("lora"), Some("dora"), None] {
        let got = collect(submit(&h, a, prompt.clone(), greedy(5))).unwrap();
        assert_eq!(got, alone(a, &prompt, &greedy(5)), "{a:?} after reloading");
    }
}

#[test]
fn abandoned_timed_out_and_bad_requests_free_their_rows() {
    let h = start(2);
    // Nobody listens after the first token: the row leaves at the next step.
    let (tx, rx) = channel();
    let r = Request {
        adapter: None,
        prompt: vec![5, 6, 7],
        cfg: GenerateConfig {
            min_new_tokens: 1000,
            ..greedy(1000)
        },
        logprobs: None,
        deadline: None,
        sink: Box::new(move |e| tx.send(e).is_ok()),
    };
    assert!(h.send(Command::Generate(r)));
    assert!(matches!(rx.recv().unwrap(), Event::Token { .. }));
    drop(rx);
    // A deadline that passes mid-generation, whatever the machine's speed: the first token
    // holds the engine (its sink runs there) until the deadline has passed, so the next step
    // finds the request late.
    let (tx, rx) = channel();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut first = true;
    let r = Request {
        adapter: Some("lora".into()),
        prompt: vec![5, 6, 7],
        cfg: GenerateConfig {
            min_new_tokens: 100,
            ..greedy(100)
        },
        logprobs: Some(3),
        deadline: Some(deadline),
        sink: Box::new(move |e| {
            if std::mem::take(&mut first) {
                let left = deadline.saturating_duration_since(Instant::now());
                std::thread::sleep(left + Duration::from_millis(20));
            }
            tx.send(e).is_ok()
        }),
    };
    assert!(h.send(Command::Generate(r)));
    match rx.recv().unwrap() {
        Event::Token { logprob, .. } => {
            let lp = logprob.unwrap();
            assert_eq!(lp.top.len(), 3);
            assert!(lp.logprob <= 0.0 && lp.top[0].1 >= lp.top[1].1);
            assert_eq!(
                lp.logprob, lp.top[0].1,
                "greedy takes the most likely token"
            );
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(collect(rx).unwrap_err().0, ErrorKind::Timeout);
    // Too long for the context, and a bad option.
    let err = collect(submit(&h, None, vec![5; 2048], greedy(3))).unwrap_err();
    assert_eq!(err.0, ErrorKind::Invalid, "{}", err.1);
    let bad = GenerateConfig {
        top_p: Some(1.5),
        ..GenerateConfig::default()
    };
    assert_eq!(
        collect(submit(&h, None, vec![5], bad)).unwrap_err().0,
        ErrorKind::Invalid
    );
    // The engine is free again: both rows are back.
    let got = collect(submit(&h, None, vec![5, 17, 9], greedy(4))).unwrap();
    assert_eq!(got, alone(None, &[5, 17, 9], &greedy(4)));
    let t0 = Instant::now();
    while kaizen::serve::Stats::get(&h.stats.active_rows) != 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "rows still active");
        std::thread::sleep(Duration::from_millis(10));
    }
}
