//! One row per kernel and the Markdown table of the matrix.

use std::{fmt::Write as _, time::Duration};

use serde_json::{Value, json};

use super::qemu::BOOT_TIMEOUT;

/// One kernel's results.
pub(super) struct KernelRow {
    pub(super) kernel: String,
    /// `uname -r` in the guest.
    pub(super) release: Option<String>,
    /// (kind, name) -> result line.
    pub(super) results: Vec<Value>,
    /// Set when the kernel could not be run at all, or the runner died.
    pub(super) error: Option<String>,
    /// Anything else the table should say (a retried boot).
    pub(super) note: Option<String>,
    pub(super) seconds: f64,
}

impl KernelRow {
    pub(super) fn failed(kernel: &str, error: String) -> Self {
        Self {
            kernel: kernel.to_owned(),
            release: None,
            results: Vec::new(),
            error: Some(error),
            note: None,
            seconds: 0.0,
        }
    }

    pub(super) fn from_console(kernel: &str, console: &str) -> Self {
        let mut row = Self::failed(kernel, String::new());
        row.error = None;
        let mut done = false;
        // The firmware's terminal escapes may precede a line's text.
        let lines = console
            .lines()
            .filter_map(|line| line.find("MESH-KCHECK").map(|at| &line[at..]));
        for line in lines {
            if let Some(release) = line.strip_prefix("MESH-KCHECK-BOOT ") {
                row.release = Some(release.trim().to_owned());
            } else if let Some(json) = line.strip_prefix("MESH-KCHECK ") {
                if let Ok(value) = serde_json::from_str(json) {
                    row.results.push(value);
                }
            } else if line.starts_with("MESH-KCHECK-DONE ") {
                done = true;
            } else if let Some(module) = line.strip_prefix("MESH-KCHECK-MODULE-FAILED ") {
                row.error = Some(format!("module {module} did not load"));
            }
        }
        if console.contains("MESH-KCHECK-TIMEOUT") {
            row.error = Some(format!("timed out after {} s", BOOT_TIMEOUT.as_secs()));
        } else if row.release.is_none() {
            row.error = Some("the guest did not boot to /init (see the console log)".into());
        } else if !done && row.error.is_none() {
            row.error = Some("the runner stopped without a verdict (see the console log)".into());
        }
        row
    }

    pub(super) fn with_time(mut self, elapsed: Duration) -> Self {
        self.seconds = elapsed.as_secs_f64();
        self
    }

    pub(super) fn ok(&self) -> bool {
        self.error.is_none()
            && !self.results.is_empty()
            && self.results.iter().all(|r| r["ok"] == true)
    }

    pub(super) fn result(&self, kind: &str, name: &str) -> Option<&Value> {
        self.results
            .iter()
            .find(|r| r["kind"] == kind && r["name"] == name)
    }

    pub(super) fn scenarios(&self) -> Vec<&Value> {
        self.results
            .iter()
            .filter(|r| r["kind"] == "scenario")
            .collect()
    }

    pub(super) fn summary(&self) -> String {
        let passed = self.scenarios().iter().filter(|r| r["ok"] == true).count();
        format!(
            "kernels: {} {} ({} of {} scenarios, {:.0} s){}",
            self.release.as_deref().unwrap_or(&self.kernel),
            if self.ok() { "PASS" } else { "FAIL" },
            passed,
            self.scenarios().len(),
            self.seconds,
            self.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )
    }

    pub(super) fn json(&self) -> Value {
        json!({
            "kernel": self.kernel,
            "release": self.release,
            "ok": self.ok(),
            "error": self.error,
            "note": self.note,
            "seconds": self.seconds,
            "results": self.results,
        })
    }
}

pub(super) const PROGRAMS: &[&str] = &[
    "mesh_from_pod",
    "mesh_to_pod",
    "mesh_sockops",
    "mesh_uplink",
    "mesh_splice",
];

/// The markdown table: one row per kernel, a column per program (load and
/// attach) and per scenario, then every failure spelled out.
pub(super) fn table(rows: &[KernelRow]) -> String {
    let scenario_names: Vec<String> = rows
        .iter()
        .flat_map(|r| r.scenarios())
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .fold(Vec::new(), |mut names, name| {
            if !names.contains(&name) {
                names.push(name);
            }
            names
        });
    let mut out = String::new();
    let _ = write!(out, "| kernel | features |");
    for program in PROGRAMS {
        let _ = write!(out, " {program} |");
    }
    for (i, _) in scenario_names.iter().enumerate() {
        let _ = write!(out, " S{} |", i + 1);
    }
    let _ = writeln!(out, " time |");
    let _ = write!(out, "|---|---|");
    for _ in 0..PROGRAMS.len() + scenario_names.len() {
        let _ = write!(out, "---|");
    }
    let _ = writeln!(out, "---|");
    let mark = |value: Option<&Value>| match value {
        None => "–".to_owned(),
        Some(v) if v["ok"] == true => "pass".to_owned(),
        Some(_) => "**FAIL**".to_owned(),
    };
    for row in rows {
        let _ = write!(
            out,
            "| {} | {} |",
            row.release.as_deref().unwrap_or(&row.kernel),
            mark(row.result("probe", "features"))
        );
        for program in PROGRAMS {
            let load = row.result("load", program);
            let attach = row.result("attach", program);
            let cell = match (load, attach) {
                (None, _) => "–".to_owned(),
                (Some(l), _) if l["ok"] != true => "load **FAIL**".to_owned(),
                (Some(_), None) => "loads".to_owned(),
                (Some(_), Some(a)) => {
                    format!("loads, {}", a["detail"].as_str().unwrap_or("attached"))
                }
            };
            let _ = write!(out, " {cell} |");
        }
        for name in &scenario_names {
            let _ = write!(out, " {} |", mark(row.result("scenario", name)));
        }
        let _ = writeln!(out, " {:.0} s |", row.seconds);
    }
    let _ = writeln!(out);
    for (i, name) in scenario_names.iter().enumerate() {
        let _ = writeln!(out, "S{}: {name}  ", i + 1);
    }
    for row in rows {
        if let Some(error) = &row.error {
            let _ = writeln!(out, "\n{}: {error}", row.kernel);
        }
        if let Some(note) = &row.note {
            let _ = writeln!(out, "\n{}: {note}", row.kernel);
        }
        for failure in row.results.iter().filter(|r| r["ok"] != true) {
            let _ = writeln!(
                out,
                "\n{} {} {}: {}",
                row.release.as_deref().unwrap_or(&row.kernel),
                failure["kind"].as_str().unwrap_or(""),
                failure["name"].as_str().unwrap_or(""),
                failure["error"].as_str().unwrap_or("")
            );
        }
    }
    out
}
