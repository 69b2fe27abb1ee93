//! Learning-rate schedules with linear warmup, as HF `transformers.optimization`
//! (`get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup`,
//! `get_cosine_schedule_with_warmup` with half a cycle). `step` is the 0-based optimizer step.

use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(format!(
                "unknown learning-rate schedule \"{other}\" (constant, linear, cosine)"
            )),
        }
    }
}

impl Schedule {
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        }
    }

    /// Learning rate for optimizer step `step` of `total`.
    pub fn lr(self, base: f64, warmup: usize, total: usize, step: usize) -> f64 {
        if step < warmup {
            return base * step as f64 / warmup.max(1) as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = (step - warmup) as f64 / span;
        match self {
            Schedule::Constant => base,
            Schedule::Linear => base * (1.0 - progress).max(0.0),
            Schedule::Cosine => {
                base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_hf_lambdas() {
        // warmup 2, total 10, base 1.0
        assert_eq!(Schedule::Linear.lr(1.0, 2, 10, 0), 0.0);
        assert_eq!(Schedule::Linear.lr(1.0, 2, 10, 1), 0.5);
        assert_eq!(Schedule::Linear.lr(1.0, 2, 10, 2), 1.0);
        assert!((Schedule::Linear.lr(1.0, 2, 10, 6) - 0.5).abs() < 1e-12);
        assert!((Schedule::Cosine.lr(1.0, 2, 10, 6) - 0.5).abs() < 1e-12);
        assert!(Schedule::Cosine.lr(1.0, 2, 10, 10).abs() < 1e-12);
        assert_eq!(Schedule::Constant.lr(1.0, 2, 10, 9), 1.0);
        assert_eq!(Schedule::Constant.lr(3e-4, 0, 10, 0), 3e-4);
    }
}
