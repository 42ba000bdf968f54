//! Per-user lanes: a user's messages are answered one after another, in the order they were
//! consumed, while different users' messages run concurrently.
//!
//! A lane holds at most one in-flight permit, taken when its next job *starts* (never while a
//! job merely waits in the lane), so five users with ten queued messages each hold five
//! permits, not fifty. A job whose handler panics does not take the lane down: the panic is
//! caught, the job is handed to a recovery path (which tells the user), the permit is
//! released and the lane goes on.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use colloquy_core::UserId;

/// What [`Lanes::push`] did with a job.
#[derive(Debug)]
pub enum Pushed<J> {
    /// The user's lane was idle: the caller must run it, starting with this job.
    Run(J),
    /// Queued behind the user's running job; the lane now holds this many waiting jobs.
    Queued(usize),
}

#[derive(Debug)]
struct Inner<J> {
    lanes: HashMap<UserId, VecDeque<J>>,
    queued: usize,
}

/// Queues of waiting jobs, one per user with work in progress.
#[derive(Debug)]
pub struct Lanes<J> {
    inner: Mutex<Inner<J>>,
}

impl<J> Default for Lanes<J> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                lanes: HashMap::new(),
                queued: 0,
            }),
        }
    }
}

impl<J> Lanes<J> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<J>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a job to its user's lane.
    pub fn push(&self, user: &UserId, job: J) -> Pushed<J> {
        let mut inner = self.lock();
        let Inner { lanes, queued } = &mut *inner;
        match lanes.get_mut(user) {
            Some(queue) => {
                queue.push_back(job);
                *queued += 1;
                Pushed::Queued(queue.len())
            }
            None => {
                lanes.insert(user.clone(), VecDeque::new());
                Pushed::Run(job)
            }
        }
    }

    /// The user's next job, or `None` (and the lane closes) when there is none.
    pub fn next(&self, user: &UserId) -> Option<J> {
        let mut inner = self.lock();
        let queue = inner.lanes.get_mut(user)?;
        let job = queue.pop_front();
        match job {
            Some(_) => inner.queued -= 1,
            None => {
                inner.lanes.remove(user);
            }
        }
        job
    }

    /// Jobs waiting (not running) across all lanes.
    #[must_use]
    pub fn queued(&self) -> usize {
        self.lock().queued
    }
}

/// How a lane's job ended, as far as the lane cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Finished (answered, failed or skipped): go on with the lane.
    Done,
    /// Shutdown interrupted it: leave it and every later job of the lane unfinished.
    Abandoned,
}

/// Runs `user`'s lane from `first` until it is empty, one job at a time, each under a permit
/// of `permits`. `handle` answers a job; if it panics, `recover` gets the job and the panic
/// message. `finished` runs after each job that ended (not abandoned), with the permit
/// already released. Returns the number of jobs left unhandled by shutdown.
#[allow(
    clippy::too_many_arguments,
    reason = "the lane's state and its three callbacks; a struct would only rename them"
)]
pub async fn run_lane<J, H, HF, R, RF, F>(
    lanes: &Lanes<J>,
    user: &UserId,
    first: J,
    permits: &Arc<Semaphore>,
    stop: &CancellationToken,
    mut handle: H,
    mut recover: R,
    mut finished: F,
) -> usize
where
    J: Send + Sync + 'static,
    H: FnMut(Arc<J>) -> HF,
    HF: Future<Output = Step> + Send,
    R: FnMut(Arc<J>, String) -> RF,
    RF: Future<Output = Step> + Send,
    F: FnMut(&J),
{
    let mut next = Some(first);
    while let Some(job) = next {
        let permit = tokio::select! {
            p = Arc::clone(permits).acquire_owned() => p.ok(),
            () = stop.cancelled() => None,
        };
        let Some(permit) = permit else {
            return 1 + drain(lanes, user);
        };
        let job = Arc::new(job);
        let step = match std::panic::AssertUnwindSafe(handle(Arc::clone(&job)))
            .catch_unwind()
            .await
        {
            Ok(step) => step,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                recover(Arc::clone(&job), message).await
            }
        };
        drop(permit);
        if step == Step::Abandoned {
            return 1 + drain(lanes, user);
        }
        finished(&job);
        next = lanes.next(user);
    }
    0
}

fn drain<J>(lanes: &Lanes<J>, user: &UserId) -> usize {
    let mut left = 0;
    while lanes.next(user).is_some() {
        left += 1;
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Interleaved pushes of several users: each user's jobs come out in push order, and
        /// only one runner per user exists at a time.
        #[test]
        fn per_user_fifo_with_one_runner(ops in proptest::collection::vec((0u8..4, any::<bool>()), 1..200)) {
            let lanes: Lanes<u32> = Lanes::default();
            let users: Vec<UserId> = (0..4).map(|i| UserId::parse(&format!("user{i}")).unwrap()).collect();
            let mut running: HashMap<usize, u32> = HashMap::new();
            let mut pushed: Vec<Vec<u32>> = vec![Vec::new(); 4];
            let mut ran: Vec<Vec<u32>> = vec![Vec::new(); 4];
            let mut counter = 0u32;
            for (u, push) in ops {
                let u = usize::from(u);
                if push {
                    counter += 1;
                    pushed[u].push(counter);
                    if let Pushed::Run(job) = lanes.push(&users[u], counter) {
                        prop_assert!(!running.contains_key(&u), "second runner for one user");
                        running.insert(u, job);
                    }
                } else if let Some(job) = running.remove(&u) {
                    ran[u].push(job);
                    if let Some(next) = lanes.next(&users[u]) { running.insert(u, next); }
                }
                let waiting: usize = (0..4).map(|u| pushed[u].len() - ran[u].len() - usize::from(running.contains_key(&u))).sum();
                prop_assert_eq!(lanes.queued(), waiting);
            }
            for (u, user) in users.iter().enumerate() {
                while let Some(job) = running.remove(&u) {
                    ran[u].push(job);
                    if let Some(next) = lanes.next(user) { running.insert(u, next); }
                }
                prop_assert_eq!(&ran[u], &pushed[u]);
            }
            prop_assert_eq!(lanes.queued(), 0);
        }
    }

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    #[tokio::test]
    async fn a_panicking_job_is_recovered_and_the_lane_and_permit_survive() {
        let lanes: Lanes<u32> = Lanes::default();
        let alice = user("alice");
        let Pushed::Run(first) = lanes.push(&alice, 1) else {
            panic!("idle lane must run");
        };
        lanes.push(&alice, 2);
        lanes.push(&alice, 3);
        let permits = Arc::new(Semaphore::new(1));
        let stop = CancellationToken::new();
        let recovered = Mutex::new(Vec::new());
        let mut finished = Vec::new();
        let left = run_lane(
            &lanes,
            &alice,
            first,
            &permits,
            &stop,
            |job: Arc<u32>| async move {
                assert!(*job != 2, "hostile input");
                Step::Done
            },
            |job, message| {
                recovered
                    .lock()
                    .unwrap()
                    .push((*job, message.contains("hostile input")));
                async { Step::Done }
            },
            |job| finished.push(*job),
        )
        .await;
        assert_eq!(left, 0);
        assert_eq!(*recovered.lock().unwrap(), vec![(2, true)]);
        assert_eq!(
            finished,
            vec![1, 2, 3],
            "every job finished, the panicked one too"
        );
        assert_eq!(permits.available_permits(), 1, "permit released");
        assert!(
            matches!(lanes.push(&alice, 4), Pushed::Run(4)),
            "lane closed, not wedged"
        );
    }

    #[tokio::test]
    async fn permits_are_taken_when_a_job_starts_not_while_it_waits() {
        // Two users, one permit: a user's queued jobs hold nothing, so the second user's
        // lane runs as soon as the first job ends, not after the whole first lane.
        let lanes: Lanes<(u8, u32)> = Lanes::default();
        let (alice, bob) = (user("alice"), user("bob"));
        let Pushed::Run(a1) = lanes.push(&alice, (0, 1)) else {
            panic!()
        };
        for n in 2..=5 {
            lanes.push(&alice, (0, n));
        }
        let Pushed::Run(b1) = lanes.push(&bob, (1, 1)) else {
            panic!()
        };
        let permits = Arc::new(Semaphore::new(1));
        let stop = CancellationToken::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        let run = |lane_user: UserId, first: (u8, u32)| {
            let (lanes, permits, stop, order) = (&lanes, &permits, &stop, Arc::clone(&order));
            async move {
                run_lane(
                    lanes,
                    &lane_user,
                    first,
                    permits,
                    stop,
                    |job: Arc<(u8, u32)>| {
                        let order = Arc::clone(&order);
                        async move {
                            order.lock().unwrap().push(*job);
                            tokio::task::yield_now().await;
                            Step::Done
                        }
                    },
                    |_, _| async { Step::Done },
                    |_| {},
                )
                .await
            }
        };
        tokio::join!(run(alice.clone(), a1), run(bob.clone(), b1));
        let order = order.lock().unwrap().clone();
        let bob_at = order.iter().position(|j| j.0 == 1).unwrap();
        assert!(bob_at <= 1, "bob waited behind alice's queue: {order:?}");
        assert_eq!(order.len(), 6);
    }

    #[tokio::test]
    async fn shutdown_leaves_the_rest_of_the_lane_unhandled() {
        let lanes: Lanes<u32> = Lanes::default();
        let alice = user("alice");
        let Pushed::Run(first) = lanes.push(&alice, 1) else {
            panic!()
        };
        lanes.push(&alice, 2);
        let permits = Arc::new(Semaphore::new(1));
        let stop = CancellationToken::new();
        let left = run_lane(
            &lanes,
            &alice,
            first,
            &permits,
            &stop,
            |_| async { Step::Abandoned },
            |_, _| async { Step::Done },
            |_| panic!("nothing finished"),
        )
        .await;
        assert_eq!(left, 2);
        assert_eq!(lanes.queued(), 0);
    }
}
