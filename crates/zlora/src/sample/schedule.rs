//! The sigma schedule of FlowMatch Euler with a static shift (diffusers 0.42 behaviour,
//! reference §5): s = linspace(1, 1/N, N); σ = shift·s / (1 + (shift − 1)·s); a terminal 0 is
//! appended. Arithmetic is f32, in the reference's order, so the grids agree bit for bit.

/// torch.linspace in f32: the first half counts up from `start`, the second half down from
/// `end`, which makes the grid symmetric.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// The most sampling steps: the scheduler has 1000 training timesteps
/// (`num_train_timesteps`), so a finer grid only repeats model times.
pub const MAX_STEPS: usize = 1000;

/// A shift the schedule can use: positive and finite (σ = shift·s / (1 + (shift − 1)·s) leaves
/// (0, 1] for shift ≤ 0, and NaN or inf give NaN sigmas), and within f32, the schedule's type.
pub fn check_shift(shift: f64) -> Result<(), String> {
    if shift > 0.0 && shift <= f32::MAX as f64 {
        Ok(())
    } else {
        Err(format!(
            "shift must be a positive finite number (the sigma schedule shift·s/(1+(shift−1)·s) \
             needs shift > 0), got {shift}"
        ))
    }
}

/// A step count the sampler can run: 1..=[`MAX_STEPS`].
pub fn check_steps(steps: usize) -> Result<(), String> {
    if (1..=MAX_STEPS).contains(&steps) {
        Ok(())
    } else {
        Err(format!(
            "steps must be 1 to {MAX_STEPS} (the scheduler has {MAX_STEPS} training timesteps), \
             got {steps}"
        ))
    }
}

/// Applies the static shift to an unshifted sigma.
pub fn shift_sigma(s: f32, shift: f32) -> f32 {
    shift * s / (1.0 + (shift - 1.0) * s)
}

/// The N + 1 sigmas of an N-step run, ending in 0.
pub fn sigmas(steps: usize, shift: f32) -> Vec<f32> {
    let mut out: Vec<f32> = linspace_f32(1.0, 1.0 / steps as f32, steps)
        .into_iter()
        .map(|s| shift_sigma(s, shift))
        .collect();
    out.push(0.0);
    out
}

/// The time the transformer is fed for a sigma: t = (1000 − 1000σ)/1000 = 1 − σ, computed
/// through the scheduler's timestep as the reference does.
pub fn model_time(sigma: f32) -> f32 {
    let timestep = sigma * 1000.0;
    (1000.0 - timestep) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_and_steps_out_of_range_are_named() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
            assert!(check_shift(bad).is_err(), "{bad}");
        }
        assert!(check_shift(3.0).is_ok() && check_shift(1e-3).is_ok());
        assert!(check_steps(0).is_err() && check_steps(1001).is_err());
        assert!(check_steps(1).is_ok() && check_steps(MAX_STEPS).is_ok());
        assert!(check_steps(4_294_967_296)
            .unwrap_err()
            .contains("1 to 1000"));
    }

    #[test]
    fn turbo_grid_matches_the_reference_table() {
        let s = sigmas(8, 3.0);
        let expected = [1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0];
        assert_eq!(s.len(), 9);
        for (a, b) in s.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{s:?}");
        }
    }

    #[test]
    fn base_grid_ends_like_the_reference() {
        let s = sigmas(50, 6.0);
        assert!((s[1] - 0.99661).abs() < 1e-5, "{}", s[1]);
        let tail = &s[47..50];
        for (a, b) in tail.iter().zip([0.276923, 0.2, 0.109091]) {
            assert!((a - b).abs() < 1e-6, "{tail:?}");
        }
        assert_eq!(s[50], 0.0);
    }

    #[test]
    fn model_time_is_one_minus_sigma() {
        assert_eq!(model_time(1.0), 0.0);
        assert!((model_time(0.3) - 0.7).abs() < 1e-6);
    }
}
