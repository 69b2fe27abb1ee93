// Drives `kaizen ui` in headless Chromium: a tiny run started from the form on a fixture model,
// its curve gaining points, stop (a checkpoint kept) and resume, a second start refused with the
// CLI's message, the runs view with overlaid curves and a `kaizen compare` report, and a chat
// with the base model and the run's adapter side by side. Saves a screenshot of each view.
//
// Environment: KAIZEN (the binary), ROOT (the repository), OUT (a scratch directory),
// SHOTS (where the screenshots go). Run through browser_test.sh.
"use strict";
const { chromium } = require("playwright-core");
const { spawn, execFileSync } = require("child_process");
const fs = require("fs");
const path = require("path");

const KAIZEN = process.env.KAIZEN, ROOT = process.env.ROOT, OUT = process.env.OUT, SHOTS = process.env.SHOTS;
const MODEL = path.join(ROOT, "tests/fixtures/models/llama-gqa-tied");
const DATA = path.join(ROOT, "tests/fixtures/ui/train.jsonl");
const RUNS = path.join(OUT, "runs");
const log = (...a) => console.log(new Date().toISOString().slice(11, 19), ...a);
let failures = 0;
function check(ok, what) { log(ok ? "ok  " : "FAIL", what); if (!ok) failures++; }

function startUi() {
  return new Promise((resolve, reject) => {
    const p = spawn(KAIZEN, ["ui", "--runs", RUNS, "--model-root", MODEL, "--data-root", path.dirname(DATA), "--port", "0"],
      { stdio: ["ignore", "inherit", "pipe"] });
    let err = "";
    p.stderr.on("data", d => {
      err += d; process.stderr.write(d);
      const m = err.match(/open (http:\/\/[^\s]+)/);
      if (m) resolve({ p, url: m[1] });
    });
    p.on("exit", c => reject(new Error("kaizen ui exited " + c + ": " + err)));
  });
}

async function main() {
  fs.mkdirSync(RUNS, { recursive: true });
  fs.mkdirSync(SHOTS, { recursive: true });
  // A comparison report for the runs view (two methods, a few steps).
  execFileSync(KAIZEN, ["compare", "--model", MODEL, "--data", DATA, "--val-data", DATA,
    "--general-data", path.join(path.dirname(DATA), "general.jsonl"), "--methods", "lora,ia3",
    "--max-steps", "10", "--batch-size", "4", "--max-len", "64", "--out", path.join(RUNS, "compare")], { stdio: "inherit" });
  const { p: ui, url } = await startUi();
  let browser = null;
  try {
    // A fresh profile; flags that keep Chromium from reaching for the (closed) network.
    browser = await chromium.launchPersistentContext(path.join(OUT, "chromium-profile"), {
      executablePath: "/usr/bin/chromium",
      headless: true,
      viewport: { width: 1400, height: 950 },
      args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    });
    const page = await browser.newPage();
    page.on("pageerror", e => { log("page error:", e.message); failures++; });
    await page.goto(url);

    // New run: the form, a bad option refused with the CLI's message, the data preview.
    await page.fill("#run-name", "demo");
    await page.fill("#model", MODEL);
    await page.fill("#data", DATA);
    const fill = { "val-data": path.join(path.dirname(DATA), "val.jsonl"), "max-steps": "1500", "lr": "-1", "batch-size": "4",
      "max-len": "64", "eval-every": "100", "save-every": "100", "r": "16", "lora-alpha": "32" };
    for (const [k, v] of Object.entries(fill)) await page.fill(`[name="${k}"]`, v);
    await page.click("#check-btn");
    await page.waitForFunction(() => document.querySelector("#form-msg").classList.contains("err"));
    const msg = await page.textContent("#form-msg");
    check(msg.includes("--lr must be > 0, found -1"), "a bad --lr is refused with the CLI's message: " + msg);
    await page.fill('[name="lr"]', "2e-3");
    await page.click("#preview-btn");
    await page.waitForSelector("#preview .example .learn");
    check((await page.$$("#preview .example")).length === 3, "the preview shows the first examples with learned tokens coloured");
    await page.screenshot({ path: path.join(SHOTS, "new-run.png"), fullPage: true });

    // Start; the live view's curve gains points.
    await page.click("#start-btn");
    await page.waitForSelector("#live.view.on");
    const points = () => page.evaluate(() => +(document.querySelector("#loss-chart").dataset.points || 0));
    await page.waitForFunction(() => +(document.querySelector("#loss-chart").dataset.points || 0) >= 20, null, { timeout: 120000 });
    const a = await points();
    await page.waitForTimeout(1500);
    const b = await points();
    check(b > a, `the loss curve gains points live (${a} -> ${b})`);
    await page.waitForFunction(() => document.querySelector("#log").textContent.includes("memory:"));
    await page.screenshot({ path: path.join(SHOTS, "live.png"), fullPage: true });

    // A second start of the same run is refused with the CLI's message.
    const second = await page.evaluate(async () => {
      const r = await fetch("/api/runs", { method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ name: "demo", options: { model: document.querySelector("#model").value, data: document.querySelector("#data").value } }) });
      return { status: r.status, body: await r.json() };
    });
    check(second.status === 400 && /another kaizen run is writing|already holds files/.test(second.body.error.message),
      "a second start is refused: " + second.body.error.message);

    // Stop: a checkpoint is kept; resume continues from it.
    await page.click("#stop-btn");
    await page.waitForFunction(() => document.querySelector("#live-status").textContent === "stopped", null, { timeout: 60000 });
    const ckpts = fs.readdirSync(path.join(RUNS, "demo")).filter(n => n.startsWith("checkpoint-"));
    check(ckpts.length > 0, "stop kept a checkpoint: " + ckpts.join(", "));
    const stoppedAt = await page.evaluate(() => document.querySelector("#stat-step").textContent);
    await page.click("#resume-btn");
    await page.waitForFunction(() => document.querySelector("#live-status").textContent === "running", null, { timeout: 60000 });
    await page.waitForFunction(() => document.querySelector("#log").textContent.includes("resuming from"), null, { timeout: 60000 });
    await page.waitForFunction(() => document.querySelector("#live-status").textContent === "finished", null, { timeout: 300000 });
    const endAt = await page.evaluate(() => document.querySelector("#stat-step").textContent);
    check(endAt.startsWith("1500"), `resumed from ${stoppedAt} and finished at ${endAt}`);
    await page.screenshot({ path: path.join(SHOTS, "live-finished.png"), fullPage: true });

    // Runs: overlay the run and the comparison's methods; open the report.
    await page.click('nav button[data-view="runs"]');
    await page.waitForSelector("#runs-table .pick");
    for (const n of ["demo", "compare/lora", "compare/ia3"]) await page.check(`#runs-table .pick[value="${n}"]`);
    await page.waitForFunction(() => +(document.querySelector("#overlay-chart").dataset.points || 0) > 1500);
    check(true, "the runs' curves overlaid");
    await page.click('#reports a[data-name="compare"]');
    await page.waitForSelector("#report img");
    await page.waitForFunction(() => [...document.querySelectorAll("#report img")].every(i => i.complete && i.naturalWidth > 0));
    check((await page.$$("#report table")).length > 0, "the compare report shows its table and charts");
    await page.screenshot({ path: path.join(SHOTS, "runs.png"), fullPage: true });

    // Chat: the base model and the run's adapter on the same prompt, streamed.
    await page.click('nav button[data-view="chat"]');
    await page.waitForSelector('#chat-runs input[value="demo"]');
    await page.check('#chat-runs input[value="demo"]');
    await page.fill("#temperature", "0");
    await page.click("#chat-load");
    await page.waitForFunction(() => document.querySelector("#chat-msg").textContent.startsWith("ready"), null, { timeout: 60000 });
    await page.fill("#prompt", "What is the capital of France?");
    await page.click("#send-btn");
    await page.waitForFunction(() => [...document.querySelectorAll(".column")].every(c => c.dataset.done === "1"), null, { timeout: 120000 });
    const answers = await page.$$eval(".column .turn.assistant", els => els.map(e => e.textContent));
    check(answers.length === 2 && answers.every(t => t.length > 0), "both columns answered: " + JSON.stringify(answers));
    check(answers[1].includes("Paris"), "the run's adapter answers a training question as trained (greedy)");
    await page.screenshot({ path: path.join(SHOTS, "chat.png"), fullPage: true });
  } finally {
    if (browser) await browser.close();
    ui.kill("SIGTERM");
  }
  log(failures ? `${failures} check(s) failed` : "all checks passed");
  process.exit(failures ? 1 : 0);
}

main().catch(e => { console.error(e); process.exit(1); });
