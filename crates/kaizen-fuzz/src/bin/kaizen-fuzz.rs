//! The stable-Rust fuzzing harness (`scripts/fuzz.sh` uses it when cargo-fuzz is missing):
//! runs campaigns over the committed seeds and prints one summary line per target.
//!
//! `kaizen-fuzz --seconds 60 --corpus fuzz/corpus --findings fuzz/findings gguf jsonl`
//! `kaizen-fuzz --replay gguf fuzz/findings/panic-gguf-0123456789abcdef`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use kaizen_fuzz::runner::{self, Config};
use kaizen_fuzz::Target;

#[global_allocator]
static ALLOC: kaizen_fuzz::alloc::Counting = kaizen_fuzz::alloc::Counting;

#[derive(Parser)]
#[command(about = "Fuzz kaizen's parsers of untrusted input")]
struct Args {
    /// Targets to run (default: all). With --replay: the target, then the files.
    names: Vec<String>,
    /// Seconds per target.
    #[arg(long)]
    seconds: Option<f64>,
    /// Cases per target (seeds included).
    #[arg(long)]
    cases: Option<u64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds one case may take before it counts as a hang.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Corpus root: <DIR>/<target>/ is read at the start and gets new inputs.
    #[arg(long)]
    corpus: Option<PathBuf>,
    #[arg(long, default_value = "fuzz/findings")]
    findings: PathBuf,
    /// Run the given files once through the target named first, printing each outcome.
    #[arg(long)]
    replay: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.replay {
        return replay(&a.names);
    }
    let targets: Vec<Target> = match a.names.is_empty() {
        true => Target::ALL.to_vec(),
        false => match a
            .names
            .iter()
            .map(|n| Target::from_name(n).ok_or(n))
            .collect()
        {
            Ok(t) => t,
            Err(n) => return unknown(n),
        },
    };
    let mut findings = 0;
    println!("| target | cases | accepted | refused | guarded panics | corpus | slowest case | peak memory | findings |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for target in targets {
        let cfg = Config {
            target,
            seed: a.seed,
            max_cases: a.cases,
            max_time: a.seconds.map(Duration::from_secs_f64),
            case_timeout: Duration::from_secs_f64(a.timeout),
            corpus_dir: a.corpus.as_ref().map(|c| c.join(target.name())),
            findings_dir: a.findings.clone(),
        };
        let s = match runner::campaign(&cfg) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {}: {e}", target.name());
                return ExitCode::from(2);
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} s ({} bytes) | {} MiB | {} |",
            target.name(),
            s.cases,
            s.accepted,
            s.refused,
            s.guarded_panics,
            s.corpus,
            s.slowest.as_secs_f64(),
            s.slowest_len,
            s.peak_bytes >> 20,
            s.findings.len()
        );
        findings += s.findings.len();
    }
    match findings {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

fn unknown(name: &str) -> ExitCode {
    let names: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
    eprintln!(
        "error: unknown target {name:?}; targets: {}",
        names.join(", ")
    );
    ExitCode::from(2)
}

fn replay(names: &[String]) -> ExitCode {
    let Some((first, files)) = names.split_first() else {
        eprintln!("error: --replay takes a target and files");
        return ExitCode::from(2);
    };
    let Some(target) = Target::from_name(first) else {
        return unknown(first);
    };
    let mut bad = false;
    for f in files {
        let bytes = match std::fs::read(f) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: {f}: {e}");
                return ExitCode::from(2);
            }
        };
        let (out, _) = runner::check(target, &bytes);
        match out {
            Ok(Ok(())) => println!("{f}: accepted"),
            Ok(Err(e)) => println!("{f}: refused: {e}"),
            Err(finding) => {
                bad = true;
                println!("{f}: FINDING: {finding}");
            }
        }
    }
    match bad {
        true => ExitCode::FAILURE,
        false => ExitCode::SUCCESS,
    }
}
