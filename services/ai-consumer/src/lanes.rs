//! Per-user lanes: a user's messages are answered one after another, in the order they were
//! consumed, while different users' messages run concurrently.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use colloquy_core::UserId;

/// Queues of waiting jobs, one per user with work in progress.
#[derive(Debug)]
pub struct Lanes<J> {
    lanes: Mutex<HashMap<UserId, VecDeque<J>>>,
}

impl<J> Default for Lanes<J> {
    fn default() -> Self {
        Self {
            lanes: Mutex::new(HashMap::new()),
        }
    }
}

impl<J> Lanes<J> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, VecDeque<J>>> {
        self.lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a job. Returns it back when the user's lane was idle: the caller must then run it
    /// (and keep calling [`Lanes::next`] until it returns `None`).
    pub fn push(&self, user: &UserId, job: J) -> Option<J> {
        let mut lanes = self.lock();
        match lanes.get_mut(user) {
            Some(queue) => {
                queue.push_back(job);
                None
            }
            None => {
                lanes.insert(user.clone(), VecDeque::new());
                Some(job)
            }
        }
    }

    /// The user's next job, or `None` (and the lane closes) when there is none.
    pub fn next(&self, user: &UserId) -> Option<J> {
        let mut lanes = self.lock();
        let queue = lanes.get_mut(user)?;
        let job = queue.pop_front();
        if job.is_none() {
            lanes.remove(user);
        }
        job
    }

    /// Users with work in progress.
    #[must_use]
    pub fn active(&self) -> usize {
        self.lock().len()
    }
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
                    if let Some(job) = lanes.push(&users[u], counter) {
                        prop_assert!(!running.contains_key(&u), "second runner for one user");
                        running.insert(u, job);
                    }
                } else if let Some(job) = running.remove(&u) {
                    ran[u].push(job);
                    if let Some(next) = lanes.next(&users[u]) { running.insert(u, next); }
                }
            }
            for (u, user) in users.iter().enumerate() {
                while let Some(job) = running.remove(&u) {
                    ran[u].push(job);
                    if let Some(next) = lanes.next(user) { running.insert(u, next); }
                }
                prop_assert_eq!(&ran[u], &pushed[u]);
            }
            prop_assert_eq!(lanes.active(), 0);
        }
    }
}
