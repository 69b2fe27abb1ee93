//! A fuzzing campaign on stable Rust: the committed seeds (and a kept corpus) are run as they
//! are, then mutated with a seeded [`Rng`] for a number of cases or seconds. Each case runs
//! under `catch_unwind`; its input is written to `<findings>/current-<target>` first, so a case
//! that ends the process (the allocation limit of [`crate::alloc`], the watchdog) can be
//! replayed. What counts as a finding: a panic that reaches the caller, a case over the time
//! limit (the watchdog saves it and aborts), an allocation past the limit (the allocator
//! refuses it and Rust aborts), and an error message with raw control characters (file content
//! that should have been quoted with `kaizen_data::quote`).
//!
//! Inputs whose outcome (an error's text with numbers blanked, or success) was not seen before
//! join the corpus, and are written to the corpus directory if there is one: a cheap stand-in
//! for the coverage feedback libFuzzer has.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use crate::mutate::{mutate, Rng};
use crate::{alloc, run, Target};

/// Inputs kept in memory per campaign, and the largest one kept.
const CORPUS_CAP: usize = 400;
const KEEP_BYTES: usize = 4 << 20;

/// How long a campaign runs and where it keeps what it finds.
#[derive(Clone, Debug)]
pub struct Config {
    pub target: Target,
    pub seed: u64,
    /// Stop after this many cases (seeds included)...
    pub max_cases: Option<u64>,
    /// ...or after this long, whichever comes first.
    pub max_time: Option<Duration>,
    /// One case longer than this is a hang: saved, reported, and the process aborts.
    pub case_timeout: Duration,
    /// Extra inputs read at the start; new ones written here (`scripts/fuzz.sh`'s corpus).
    pub corpus_dir: Option<PathBuf>,
    /// Where findings and the current case are written.
    pub findings_dir: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Finding {
    pub kind: &'static str,
    pub message: String,
    pub file: PathBuf,
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub cases: u64,
    pub accepted: u64,
    pub refused: u64,
    /// Panics inside a dependency that kaizen's guard turned into errors (not findings).
    pub guarded_panics: u64,
    pub findings: Vec<Finding>,
    pub corpus: usize,
    pub slowest: Duration,
    pub slowest_len: usize,
    /// The most memory one case added to what was live before it (an upper bound when other
    /// threads allocate at the same time).
    pub peak_bytes: usize,
    pub elapsed: Duration,
}

thread_local! {
    static PANICS: Cell<u64> = const { Cell::new(0) };
    /// Whether this thread is running a case (panics outside one are reported as usual).
    static IN_CASE: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A hook that is silent during a case, remembering where a panic happened (the runner
/// reports it); other panics, and those on threads a case started (rayon's), go to the hook
/// that was there before.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !IN_CASE.with(Cell::get) {
                return previous(info);
            }
            PANICS.with(|p| p.set(p.get() + 1));
            let msg = match (
                info.payload().downcast_ref::<&str>(),
                info.payload().downcast_ref::<String>(),
            ) {
                (Some(s), _) => s.to_string(),
                (_, Some(s)) => s.clone(),
                _ => "panic".to_string(),
            };
            let at = info
                .location()
                .map_or(String::new(), |l| format!(" at {l}"));
            LAST_PANIC.with(|p| *p.borrow_mut() = format!("{msg}{at}"));
        }));
    });
}

/// Inputs of a directory, by file name (so a campaign is the same on every machine).
pub fn read_dir(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

fn hash(bytes: &[u8]) -> u64 {
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// What an outcome looks like with its numbers and temporary paths blanked.
fn signature(result: &Result<(), String>) -> String {
    match result {
        Ok(()) => "ok".to_string(),
        Err(e) => e
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect::<String>()
            .split_whitespace()
            .filter(|w| !w.contains("kaizen-fuzz-"))
            .take(24)
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Watches the running case; past the limit it saves the case and aborts the process.
struct Watchdog {
    started: Arc<Mutex<Option<Instant>>>,
    done: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(target: Target, limit: Duration, current: PathBuf, findings: PathBuf) -> Watchdog {
        let started = Arc::new(Mutex::new(None::<Instant>));
        let done = Arc::new(AtomicBool::new(false));
        let (s, d) = (started.clone(), done.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                let since = *s.lock().unwrap_or_else(|e| e.into_inner());
                if since.is_some_and(|t| t.elapsed() > limit) {
                    let bytes = std::fs::read(&current).unwrap_or_default();
                    let file =
                        findings.join(format!("hang-{}-{:016x}", target.name(), hash(&bytes)));
                    let _ = std::fs::write(&file, &bytes);
                    eprintln!(
                        "FINDING {}: a case ran over {:?} (hang); input saved as {}",
                        target.name(),
                        limit,
                        file.display()
                    );
                    std::process::abort();
                }
            }
        });
        Watchdog { started, done }
    }

    fn begin(&self) {
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn end(&self) {
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Runs one input once, as the campaign does: `Err(finding message)` for a panic that reached
/// here or an error message with control characters.
pub fn check(target: Target, input: &[u8]) -> (Result<Result<(), String>, String>, u64) {
    check_with(|| run(target, input))
}

/// [`check`] of any case (the runner's own tests give it one that panics).
pub fn check_with(
    case: impl FnOnce() -> Result<(), String>,
) -> (Result<Result<(), String>, String>, u64) {
    install_hook();
    let before = PANICS.with(Cell::get);
    IN_CASE.with(|c| c.set(true));
    let out = panic::catch_unwind(AssertUnwindSafe(case));
    IN_CASE.with(|c| c.set(false));
    let panics = PANICS.with(Cell::get) - before;
    match out {
        Err(_) => (
            Err(format!(
                "panic: {}",
                LAST_PANIC.with(|p| p.borrow().clone())
            )),
            0,
        ),
        Ok(Err(e)) if e.chars().any(char::is_control) => (
            Err(format!(
                "error message with control characters: {}",
                kaizen_data::quote(&e)
            )),
            panics,
        ),
        Ok(r) => (Ok(r), panics),
    }
}

/// Runs a campaign; findings are saved under `findings_dir` and returned in the stats.
pub fn campaign(cfg: &Config) -> std::io::Result<Stats> {
    static CAMPAIGNS: AtomicU64 = AtomicU64::new(0);
    install_hook();
    std::fs::create_dir_all(&cfg.findings_dir)?;
    if let Some(dir) = &cfg.corpus_dir {
        std::fs::create_dir_all(dir)?;
    }
    let start = Instant::now();
    let id = CAMPAIGNS.fetch_add(1, Ordering::Relaxed);
    let current = cfg.findings_dir.join(format!(
        "current-{}-{}-{id}",
        cfg.target.name(),
        std::process::id()
    ));
    let dog = Watchdog::start(
        cfg.target,
        cfg.case_timeout,
        current.clone(),
        cfg.findings_dir.clone(),
    );
    let mut corpus = read_dir(&cfg.target.seed_dir());
    if corpus.is_empty() {
        return Err(std::io::Error::other(format!(
            "no seeds in {}",
            cfg.target.seed_dir().display()
        )));
    }
    if let Some(dir) = &cfg.corpus_dir {
        corpus.extend(read_dir(dir));
    }
    let initial = corpus.len() as u64;
    let mut seen: HashSet<String> = HashSet::new();
    let mut found: HashSet<String> = HashSet::new();
    let mut rng = Rng::new(cfg.seed);
    let mut stats = Stats::default();
    loop {
        let over_time = cfg.max_time.is_some_and(|t| start.elapsed() >= t);
        if over_time || cfg.max_cases.is_some_and(|n| stats.cases >= n) {
            break;
        }
        let input = match stats.cases < initial {
            true => corpus[stats.cases as usize].clone(),
            false => {
                let base = rng.below(corpus.len());
                let others: Vec<&[u8]> = corpus.iter().map(Vec::as_slice).collect();
                mutate(&corpus[base], cfg.target.format(), &others, &mut rng)
            }
        };
        std::fs::write(&current, &input)?;
        let base = alloc::live();
        alloc::reset_peak();
        dog.begin();
        let t0 = Instant::now();
        let (out, guarded) = check(cfg.target, &input);
        let took = t0.elapsed();
        dog.end();
        stats.cases += 1;
        stats.guarded_panics += guarded;
        // Other threads (tests run side by side) count too: an upper bound on this case's.
        stats.peak_bytes = stats.peak_bytes.max(alloc::peak().saturating_sub(base));
        if took > stats.slowest {
            stats.slowest = took;
            stats.slowest_len = input.len();
        }
        let result = match out {
            Ok(r) => r,
            Err(message) => {
                let kind = if message.starts_with("panic") {
                    "panic"
                } else {
                    "error-text"
                };
                // A panic is known by where it happened, not by the input it quotes.
                let sig = match message.rsplit_once(" at ") {
                    Some((_, at)) if kind == "panic" => at.to_string(),
                    _ => signature(&Err(message.clone())),
                };
                if found.insert(sig) {
                    let file = cfg.findings_dir.join(format!(
                        "{kind}-{}-{:016x}",
                        cfg.target.name(),
                        hash(&input)
                    ));
                    std::fs::write(&file, &input)?;
                    eprintln!(
                        "FINDING {}: {message}; input saved as {}",
                        cfg.target.name(),
                        file.display()
                    );
                    stats.findings.push(Finding {
                        kind,
                        message,
                        file,
                    });
                }
                continue;
            }
        };
        match &result {
            Ok(()) => stats.accepted += 1,
            Err(_) => stats.refused += 1,
        }
        if seen.insert(signature(&result)) && stats.cases > initial && input.len() <= KEEP_BYTES {
            if let Some(dir) = &cfg.corpus_dir {
                std::fs::write(dir.join(format!("{:016x}", hash(&input))), &input)?;
            }
            if corpus.len() < CORPUS_CAP {
                corpus.push(input);
            }
        }
    }
    drop(dog);
    let _ = std::fs::remove_file(&current);
    stats.corpus = corpus.len();
    stats.elapsed = start.elapsed();
    Ok(stats)
}
