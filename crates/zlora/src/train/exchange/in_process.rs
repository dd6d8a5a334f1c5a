//! A data-parallel group of threads in one process (the CPU tests of data-parallel training).
//!
//! Each collective is a round: every worker leaves its numbers (on the host, in f32) in its
//! slot, and the last to arrive computes the mean, summing in rank order so that every run
//! gives the same bits, and wakes the others. A worker that goes away (its `InProcess` is
//! dropped: its thread returned, failed or panicked) breaks the group: every worker waiting
//! in a round, and every later call, fails with an error naming it instead of waiting
//! forever. A worker that stays alive but never arrives (a deadlock) still blocks the others:
//! there is no timeout, because a barrier may rightly wait hours for rank 0's cache build.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::{DType, Tensor};

use super::GradientExchange;
use crate::{Error, Result};

/// One worker's place in an in-process group.
pub struct InProcess {
    rank: usize,
    world_size: usize,
    shared: Arc<Shared>,
}

struct Shared {
    round: Mutex<Round>,
    arrived: Condvar,
}

/// Each tensor's values of one worker, flattened.
type Contribution = Vec<Vec<f32>>;

struct Round {
    /// Completed rounds; a waiter knows its round is done when this moves on.
    generation: u64,
    slots: Vec<Option<Contribution>>,
    /// The last completed round's means, or why they could not be formed (kept until every
    /// worker has arrived at the next round, so until every worker has taken them).
    means: std::result::Result<Arc<Contribution>, String>,
    /// Why the group can no longer complete a round.
    broken: Option<String>,
}

impl InProcess {
    /// A group of `n` workers, ranks 0..n: give one to each thread.
    pub fn group(n: usize) -> Vec<InProcess> {
        let shared = Arc::new(Shared {
            round: Mutex::new(Round {
                generation: 0,
                slots: vec![None; n],
                means: Ok(Arc::new(Vec::new())),
                broken: None,
            }),
            arrived: Condvar::new(),
        });
        (0..n)
            .map(|rank| InProcess {
                rank,
                world_size: n,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Leaves this worker's contribution and returns the round's means once every worker has
    /// left its own.
    fn meet(&self, mine: Contribution) -> Result<Arc<Contribution>> {
        let mut round = self.lock()?;
        if let Some(why) = &round.broken {
            return Err(Error::Invalid(why.clone()));
        }
        let mine_done = round.generation + 1;
        round.slots[self.rank] = Some(mine);
        if round.slots.iter().all(Option::is_some) {
            let contributions: Vec<Contribution> =
                round.slots.iter_mut().filter_map(Option::take).collect();
            round.means = mean_in_rank_order(&contributions).map(Arc::new);
            round.broken = round.means.clone().err();
            round.generation = mine_done;
            self.shared.arrived.notify_all();
        }
        while round.generation < mine_done {
            if let Some(why) = &round.broken {
                return Err(Error::Invalid(why.clone()));
            }
            round = self.shared.arrived.wait(round).map_err(|_| poisoned())?;
        }
        // The round completed (a worker that left after it does not undo it).
        round.means.clone().map_err(Error::Invalid)
    }

    fn lock(&self) -> Result<MutexGuard<'_, Round>> {
        self.shared.round.lock().map_err(|_| poisoned())
    }
}

fn poisoned() -> Error {
    Error::Invalid("data-parallel group: a worker panicked during an exchange".into())
}

/// The element-wise mean of every worker's tensors, summed in rank order.
fn mean_in_rank_order(contributions: &[Contribution]) -> std::result::Result<Contribution, String> {
    let first = &contributions[0];
    let same_shapes = contributions
        .iter()
        .all(|c| c.len() == first.len() && c.iter().zip(first).all(|(a, b)| a.len() == b.len()));
    if !same_shapes {
        return Err(
            "data-parallel group: the workers exchanged tensors of different sizes (they are not running the same training)".into(),
        );
    }
    let n = contributions.len() as f32;
    Ok((0..first.len())
        .map(|t| {
            let mut sum = contributions[0][t].clone();
            for c in &contributions[1..] {
                sum.iter_mut().zip(&c[t]).for_each(|(s, v)| *s += v);
            }
            sum.iter_mut().for_each(|s| *s /= n);
            sum
        })
        .collect())
}

impl GradientExchange for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_mean(&mut self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        let mine = tensors
            .iter()
            .map(|t| Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?))
            .collect::<Result<Contribution>>()?;
        let means = self.meet(mine)?;
        tensors
            .iter()
            .zip(means.iter())
            .map(|(t, m)| {
                let mean = Tensor::from_slice(m, t.shape(), t.device())?;
                Ok(mean.to_dtype(t.dtype())?)
            })
            .collect()
    }

    fn barrier(&mut self) -> Result<()> {
        self.meet(Vec::new()).map(drop)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // Even a poisoned lock holds a usable Round: the others must still be woken.
        let mut round = self.shared.round.lock().unwrap_or_else(|e| e.into_inner());
        if round.broken.is_none() {
            round.broken = Some(format!(
                "data-parallel group: worker {} of {} has stopped (see its error)",
                self.rank, self.world_size
            ));
        }
        self.shared.arrived.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;
    use std::time::Duration;

    /// Runs `work` on each worker of a group of `n`, one thread each; the results by rank.
    fn on_threads<T: Send + 'static>(
        n: usize,
        work: impl Fn(InProcess) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let work = Arc::new(work);
        let threads: Vec<_> = InProcess::group(n)
            .into_iter()
            .map(|worker| {
                let work = work.clone();
                thread::spawn(move || work(worker))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn every_worker_gets_the_mean_in_its_own_shape_and_dtype() {
        let results = on_threads(3, |mut w| {
            let r = w.rank() as f32;
            let a = Tensor::new(&[[r, 2.0 * r, 1.0], [0.5, r * r, -r]], &Device::Cpu).unwrap();
            let b = Tensor::new(&[r + 4.0], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let means = w.all_reduce_mean(&[a, b]).unwrap();
            assert_eq!(means[0].dims(), &[2, 3]);
            assert_eq!(means[1].dtype(), DType::BF16);
            let b = means[1].to_dtype(DType::F32).unwrap().to_vec1::<f32>();
            (means[0].to_vec2::<f32>().unwrap(), b.unwrap())
        });
        // Ranks 0, 1, 2: means 1, 2, 1; 0.5, 5/3, -1; and 5.
        let expected = vec![vec![1.0, 2.0, 1.0], vec![0.5, 5.0 / 3.0, -1.0]];
        for (a, b) in results {
            assert_eq!(a, expected);
            assert_eq!(b, vec![5.0]);
        }
    }

    #[test]
    fn a_barrier_returns_only_once_every_worker_has_arrived() {
        let late_arrived = Arc::new(AtomicBool::new(false));
        let flag = late_arrived.clone();
        let seen = on_threads(2, move |mut w| {
            if w.rank() == 1 {
                thread::sleep(Duration::from_millis(300));
                flag.store(true, Ordering::SeqCst);
            }
            w.barrier().unwrap();
            flag.load(Ordering::SeqCst)
        });
        assert_eq!(seen, vec![true, true]);
    }

    #[test]
    fn a_worker_that_stops_fails_the_others_instead_of_leaving_them_waiting() {
        let results = on_threads(3, |mut w| {
            if w.rank() == 2 {
                thread::sleep(Duration::from_millis(100));
                drop(w);
                return Ok(());
            }
            let waiting = w.barrier();
            assert!(w.barrier().is_err(), "a later call fails too");
            waiting
        });
        for r in &results[..2] {
            let e = r.as_ref().unwrap_err().to_string();
            assert!(e.contains("worker 2 of 3 has stopped"), "{e}");
        }
    }

    /// Worker 1 completes the round worker 0 waits in and leaves at once, most likely before
    /// worker 0 wakes: worker 0 still gets the round's means.
    #[test]
    fn a_completed_round_delivers_its_means_whoever_leaves_after_it() {
        let results = on_threads(2, |mut w| {
            if w.rank() == 1 {
                thread::sleep(Duration::from_millis(100));
            }
            let t = Tensor::new(&[w.rank() as f32 * 2.0], &Device::Cpu).unwrap();
            w.all_reduce_mean(&[t]).unwrap()[0]
                .to_vec1::<f32>()
                .unwrap()
        });
        assert_eq!(results, vec![vec![1.0], vec![1.0]]);
    }

    #[test]
    fn workers_exchanging_different_sizes_all_fail() {
        let results = on_threads(2, |mut w| {
            let t = Tensor::zeros(w.rank() + 1, DType::F32, &Device::Cpu).unwrap();
            w.all_reduce_mean(&[t]).map(drop)
        });
        for r in results {
            assert!(r.unwrap_err().to_string().contains("different sizes"));
        }
    }
}
