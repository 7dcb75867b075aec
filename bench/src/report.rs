//! The output: one line per figure, printed as soon as it is known and kept for the `--out` file.

use std::io::Write as _;

/// How a figure compares with its goal.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Met,
    NotMet,
    /// The figure is not valid: a check failed (lost events, wrong totals, HTTP errors...).
    Failed,
}

impl Status {
    pub fn from_goal(met: bool) -> Status {
        if met {
            Status::Met
        } else {
            Status::NotMet
        }
    }

    fn word(self) -> &'static str {
        match self {
            Status::Met => "MET",
            Status::NotMet => "NOT MET",
            Status::Failed => "FAILED",
        }
    }
}

/// One figure: `name  value   reference …   ratio …   goal …   STATUS   (notes)`.
pub struct Figure {
    pub name: &'static str,
    /// Already formatted with its unit, e.g. "71234 req/s".
    pub value: String,
    /// E.g. "95012 req/s (noop axum)".
    pub reference: Option<String>,
    pub ratio: Option<f64>,
    /// E.g. ">= 0.75".
    pub goal: String,
    pub status: Status,
    /// Extra facts, printed in parentheses at the end.
    pub notes: Vec<String>,
}

impl Figure {
    pub fn new(name: &'static str, value: String, goal: String, status: Status) -> Figure {
        Figure { name, value, reference: None, ratio: None, goal, status, notes: Vec::new() }
    }

    pub fn line(&self) -> String {
        let mut s = format!("{:<16} {:>22}", self.name, self.value);
        if let Some(r) = &self.reference {
            s.push_str(&format!("   reference {r:>32}"));
        }
        if let Some(r) = self.ratio {
            s.push_str(&format!("   ratio {r:.2}"));
        }
        s.push_str(&format!("   goal {}   {}", self.goal, self.status.word()));
        if !self.notes.is_empty() {
            s.push_str(&format!("   ({})", self.notes.join("; ")));
        }
        s
    }
}

/// Everything printed, in order.
#[derive(Default)]
pub struct Report {
    pub lines: Vec<String>,
    /// Set by a FAILED figure or a scenario error: the driver then exits 1.
    pub failed: bool,
}

impl Report {
    /// Prints a line now and keeps it for the output file.
    pub fn line(&mut self, line: impl Into<String>) {
        let line = line.into();
        println!("{line}");
        let _ = std::io::stdout().flush();
        self.lines.push(line);
    }

    pub fn figure(&mut self, figure: Figure) {
        if figure.status == Status::Failed {
            self.failed = true;
        }
        self.line(figure.line());
    }
}
