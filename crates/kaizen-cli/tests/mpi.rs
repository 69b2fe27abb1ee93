//! Data-parallel `kaizen train` under Open MPI's `mpirun` (cargo feature `mpi`), on the tiny
//! llama fixture with one thread per rank: two ranks train the adapter that one process trains
//! with `--grad-accum 2` (LoRA with dropout, a prefix table, a P-tuning encoder, full
//! fine-tuning), a checkpoint written under one rank count resumes under the other, ranks whose
//! data or options differ are refused before the first step, and a killed rank ends the job with
//! its checkpoint intact and resumable.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const LLAMA: &str = "llama-gqa-tied";
/// mpirun starts in about a second; a run here is a few more.
const MPI_TIMEOUT: Duration = Duration::from_secs(60);
/// The bound: two ranks give one process's adapter within this, relative to each
/// tensor's largest value (the sums differ only in f32 rounding; see ARCHITECTURE.md).
const TOL: f32 = 1e-6;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Completions of 1-5 words: micro-batches with different label counts.
fn data(dir: &Path) -> PathBuf {
    let words = [
        "apple", "river", "stone", "cloud", "green", "seven", "tiger",
    ];
    let body: String = (0..10)
        .map(|i| {
            let c: Vec<_> = (0..1 + i % 5).map(|j| words[(i + j) % 7]).collect();
            format!(
                "{}\n",
                json!({"prompt": format!("Item {i}:"), "completion": format!(" {}", c.join(" "))})
            )
        })
        .collect();
    let path = dir.join("train.jsonl");
    std::fs::write(&path, body).unwrap();
    path
}

fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--model",
        &s(&model_path(LLAMA)),
        "--data",
        &s(data),
    ]
    .map(String::from)
    .into();
    args.extend(["--out".into(), s(out), "--val-split".into(), "0.2".into()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// `mpirun -np 1 kaizen ARGS : -np 1 kaizen ARGS ...`, one group of arguments per rank.
fn mpirun_command(ranks: &[Vec<String>]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe"]);
    cmd.args(["-x", "RAYON_NUM_THREADS=1"]);
    for (i, args) in ranks.iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        cmd.args(["-np", "1", env!("CARGO_BIN_EXE_kaizen")])
            .args(args);
    }
    cmd
}

fn mpirun(ranks: &[Vec<String>]) -> Run {
    run_command(mpirun_command(ranks), MPI_TIMEOUT)
}

fn one_process(args: &[String]) -> Run {
    kaizen_env(args, &[("RAYON_NUM_THREADS", "1")])
}

/// Every tensor of every .safetensors file in `a` equals `b`'s within [`TOL`].
fn assert_same_tensors(a: &Path, b: &Path) {
    let mut files = 0;
    for entry in std::fs::read_dir(b).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        files += 1;
        let want = kaizen::checkpoint::adapter::load_tensors(&path).unwrap();
        let name = path.file_name().unwrap();
        let got = kaizen::checkpoint::adapter::load_tensors(&a.join(name)).unwrap();
        assert_eq!(got.len(), want.len(), "{name:?}: tensors");
        for (key, w) in &want {
            let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let g: Vec<f32> = got[key].flatten_all().unwrap().to_vec1().unwrap();
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
            let diff = g
                .iter()
                .zip(&w)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= TOL * scale,
                "{name:?} {key}: max |diff| {diff}, max |value| {scale} ({} vs {})",
                a.display(),
                b.display()
            );
        }
    }
    assert!(files > 0, "no .safetensors in {}", b.display());
}

fn step_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

#[test]
fn two_ranks_train_what_one_process_trains_with_grad_accum_2() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let common = ["--max-steps", "3", "--batch-size", "2", "--lr", "1e-2"];
    let methods: [&[&str]; 4] = [
        &["--method", "lora", "--lora-dropout", "0.1"],
        &["--method", "prefix", "--num-virtual-tokens", "3"],
        &[
            "--method",
            "p-tuning",
            "--num-virtual-tokens",
            "3",
            "--encoder-hidden-size",
            "8",
        ],
        &["--method", "full"],
    ];
    for method in methods {
        let extra = [&common[..], method].concat();
        let dir = tmp.path().join(method[1]);
        let (one, two) = (dir.join("one"), dir.join("two"));
        one_process(&train_args(
            &data,
            &one,
            &[&extra[..], &["--grad-accum", "2"]].concat(),
        ))
        .ok();
        let ranks = vec![train_args(&data, &two, &extra); 2];
        let stdout = mpirun(&ranks).ok();
        assert_eq!(
            stdout.matches("trained 3 steps").count(),
            1,
            "rank 0 alone reports: {stdout}"
        );
        assert_same_tensors(&two, &one);
        let (l1, l2) = (step_losses(&one), step_losses(&two));
        assert_eq!(l1.len(), 3);
        for (a, b) in l1.iter().zip(&l2) {
            assert_close(&format!("{}: step loss", method[1]), *b, *a, 1e-6);
        }
        assert!(two.join("loss.png").is_file(), "rank 0 draws loss.png");
    }
}

#[test]
fn a_checkpoint_resumes_under_another_rank_count() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let opts = [
        "--max-steps",
        "4",
        "--batch-size",
        "1",
        "--save-every",
        "2",
        "--lr",
        "1e-2",
    ];
    let accum2 = [&opts[..], &["--grad-accum", "2"]].concat();
    let whole = tmp.path().join("whole");
    one_process(&train_args(&data, &whole, &accum2)).ok();
    // As if each run had died after checkpoint-2: no final adapter.
    let cut = |out: &Path| {
        std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
        assert!(out.join("checkpoint-2").is_dir());
    };
    // Two ranks, resumed by one process...
    let by_two = tmp.path().join("by_two");
    mpirun(&vec![train_args(&data, &by_two, &opts); 2]).ok();
    cut(&by_two);
    let resumed = one_process(&train_args(
        &data,
        &by_two,
        &[&accum2[..], &["--resume"]].concat(),
    ));
    assert!(
        resumed.stderr.contains("checkpoint-2"),
        "{}",
        resumed.stderr
    );
    resumed.ok();
    assert_same_tensors(&by_two, &whole);
    // ...and one process resumed by two ranks.
    let by_one = tmp.path().join("by_one");
    one_process(&train_args(&data, &by_one, &accum2)).ok();
    cut(&by_one);
    mpirun(&vec![
        train_args(
            &data,
            &by_one,
            &[&opts[..], &["--resume"]].concat()
        );
        2
    ])
    .ok();
    assert_same_tensors(&by_one, &whole);
    // A different global batch is another run.
    cut(&by_one);
    let err = one_process(&train_args(
        &data,
        &by_one,
        &[&opts[..], &["--resume"]].concat(),
    ))
    .fails();
    assert_mentions(&err, &["--resume", "options differ"]);
}

#[test]
fn ranks_with_different_data_or_options_are_refused_before_the_first_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let other = tmp.path().join("other.jsonl");
    std::fs::write(
        &other,
        "{\"text\": \"something else entirely\"}\n".repeat(10),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let base = ["--max-steps", "2", "--batch-size", "2"];
    let run = mpirun(&[
        train_args(&data, &out, &base),
        train_args(&data, &out, &[&base[..], &["--lr", "1e-3"]].concat()),
        train_args(&other, &out, &base),
    ]);
    assert_ne!(run.code, Some(0), "{}", run.stderr);
    assert_mentions(
        &run.stderr,
        &[
            "of 3: the ranks do not train the same run",
            "rank 1's options",
            "rank 2's data and options",
        ],
    );
    assert!(
        !out.exists(),
        "nothing may be written before the ranks agree"
    );
}

/// The pid of rank `rank` among the processes mpirun `parent` started.
fn rank_pid(parent: u32, rank: usize) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: u32 = stat
            .rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        let is_rank = environ.split(|&b| b == 0).any(|v| v == want.as_bytes());
        (ppid == parent && is_rank).then_some(pid)
    })
}

#[test]
fn a_killed_rank_ends_the_job_and_its_checkpoint_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let out = tmp.path().join("run");
    let opts = [
        "--max-steps",
        "400",
        "--batch-size",
        "2",
        "--save-every",
        "2",
    ];
    let mut cmd = mpirun_command(&vec![train_args(&data, &out, &opts); 2]);
    let mut job = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start mpirun");
    let start = Instant::now();
    while !out.join("checkpoint-4").is_dir() {
        assert!(
            start.elapsed() < MPI_TIMEOUT,
            "no checkpoint-4 after {MPI_TIMEOUT:?}"
        );
        assert!(
            job.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = rank_pid(job.id(), 1).expect("rank 1's process");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let killed = Instant::now();
    let status = loop {
        if let Some(status) = job.try_wait().unwrap() {
            break status;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "ranks still running 10 s after rank 1 was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut job.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert_mentions(&stderr, &["process rank 1", "signal 9"]);
    assert!(!out.join("adapter_model.safetensors").exists());
    // The last checkpoint is whole, and the run finishes from it.
    let resumed = mpirun(&vec![
        train_args(
            &data,
            &out,
            &[&opts[..], &["--resume"]].concat()
        );
        2
    ]);
    assert!(
        resumed.stderr.contains("resuming from"),
        "{}",
        resumed.stderr
    );
    assert!(resumed.ok().contains("trained 400 steps"));
    assert!(out.join("adapter_model.safetensors").is_file());
}
