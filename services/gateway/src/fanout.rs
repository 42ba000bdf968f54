//! Fan-out of deliveries to the sockets this gateway holds.
//!
//! One Redis subscriber connection per gateway multiplexes the `user:{U}` channels of every
//! user with a socket here: subscribed on the user's first socket, unsubscribed after the
//! last. Subscribe and unsubscribe commands go through one task, in order, so a user who
//! disconnects and reconnects at once never ends up unsubscribed. Whenever a connection may
//! have missed something (Redis reconnect, a lagging channel) it stops taking live deliveries
//! at once and is told to resync, and replays from the durable inbox stream. After a Redis
//! reconnect the same task re-subscribes every channel first and only then asks for the
//! replays, so no replay runs before its subscription is live.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use colloquy_core::UserId;
use colloquy_core::backoff::Backoff;
use colloquy_core::names::Names;
use colloquy_core::records::Delivery;

use crate::events::{ResubscribeFailed, SubscribeFailed, UnsubscribeFailed};
use crate::session::Outbound;

/// What the fan-out needs of its Redis subscriber connection: fred's [`SubscriberClient`] in
/// production, a scripted one in the unit tests (which check the order of re-subscribe and
/// resync without a Redis).
pub trait Channels: Send + Sync + 'static {
    /// Whether the connection is up (a subscribe could succeed now).
    fn is_connected(&self) -> bool;
    /// Subscribes one channel.
    fn subscribe(&self, channel: String) -> impl Future<Output = Result<(), String>> + Send;
    /// Unsubscribes one channel.
    fn unsubscribe(&self, channel: String) -> impl Future<Output = Result<(), String>> + Send;
    /// Subscribes every channel subscribed before a reconnect again.
    fn resubscribe_all(&self) -> impl Future<Output = Result<(), String>> + Send;
}

impl Channels for SubscriberClient {
    fn is_connected(&self) -> bool {
        ClientLike::is_connected(self)
    }

    async fn subscribe(&self, channel: String) -> Result<(), String> {
        PubsubInterface::subscribe(self, channel)
            .await
            .map_err(|e| e.to_string())
    }

    async fn unsubscribe(&self, channel: String) -> Result<(), String> {
        PubsubInterface::unsubscribe(self, channel)
            .await
            .map_err(|e| e.to_string())
    }

    async fn resubscribe_all(&self) -> Result<(), String> {
        if self.tracked_channels().is_empty() {
            return Ok(());
        }
        SubscriberClient::resubscribe_all(self)
            .await
            .map_err(|e| e.to_string())
    }
}

/// A signal that a connection may have missed deliveries and must replay.
///
/// Two steps: [`Resync::mark_gap`] stops live deliveries to the connection at once (a later
/// event written before the replay would move its cursor past a missed one), and
/// [`Resync::request`] tells the session to replay, which may come later (after the
/// subscription is live again).
#[derive(Debug, Default)]
pub struct Resync {
    gap: AtomicBool,
    requested: AtomicBool,
    notify: Notify,
}

impl Resync {
    /// The connection may have missed deliveries: take no live ones until it replays.
    pub fn mark_gap(&self) {
        self.gap.store(true, Ordering::Release);
    }

    /// Marks the gap and asks the session to replay.
    pub fn request(&self) {
        self.gap.store(true, Ordering::Release);
        self.requested.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Whether the connection is in a gap that its replay has not yet taken over.
    #[must_use]
    pub fn in_gap(&self) -> bool {
        self.gap.load(Ordering::Acquire)
    }

    /// Waits until a replay is requested, then clears the request and the gap: the session
    /// starts its replay at once and holds live deliveries from then on.
    pub async fn requested(&self) {
        loop {
            if self.requested.swap(false, Ordering::AcqRel) {
                self.gap.store(false, Ordering::Release);
                return;
            }
            self.notify.notified().await;
        }
    }
}

/// A connection as the fan-out sees it.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    pub id: u64,
    pub tx: mpsc::Sender<Outbound>,
    pub resync: Arc<Resync>,
}

/// Why a connection could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("too many connections for this user")]
    TooManyConnections,
    #[error("cannot subscribe to deliveries (Redis unavailable): {0}")]
    Subscribe(String),
}

enum SubCmd {
    Subscribe(UserId, oneshot::Sender<Result<(), String>>),
    Unsubscribe(UserId),
    /// The subscriber reconnected: subscribe every channel again, then resync every connection.
    Resubscribe,
}

/// The registry of local connections and the subscriber behind it.
pub struct Fanout {
    names: Names,
    connected: Box<dyn Fn() -> bool + Send + Sync>,
    max_per_user: usize,
    users: Mutex<HashMap<UserId, Vec<ConnHandle>>>,
    commands: mpsc::UnboundedSender<SubCmd>,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout").finish_non_exhaustive()
    }
}

impl Fanout {
    /// Starts the subscription manager and the listener over `subscriber`.
    #[must_use]
    pub fn start(
        subscriber: SubscriberClient,
        names: Names,
        max_per_user: usize,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let fanout = Self::start_with(subscriber.clone(), names, max_per_user, shutdown.clone());
        tokio::spawn(listen(Arc::clone(&fanout), subscriber, shutdown));
        fanout
    }

    /// Starts the subscription manager over `channels`; deliveries come in through
    /// [`Fanout::dispatch`] and reconnects through [`Fanout::on_reconnect`].
    #[must_use]
    pub fn start_with<C: Channels>(
        channels: C,
        names: Names,
        max_per_user: usize,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (commands, rx) = mpsc::unbounded_channel();
        let channels = Arc::new(channels);
        let probe = Arc::clone(&channels);
        let fanout = Arc::new(Self {
            names,
            connected: Box::new(move || probe.is_connected()),
            max_per_user,
            users: Mutex::new(HashMap::new()),
            commands,
        });
        tokio::spawn(manage_subscriptions(
            Arc::clone(&fanout),
            channels,
            rx,
            shutdown,
        ));
        fanout
    }

    /// The subscriber reconnected, so deliveries may have been missed: live ones stop at once
    /// for every connection, and the subscription task re-subscribes every channel and only
    /// then asks every connection to replay (a replay before the subscription is live could
    /// miss an answer published in between).
    pub fn on_reconnect(&self) {
        self.mark_gap_all();
        let _ = self.commands.send(SubCmd::Resubscribe);
    }

    fn users(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, Vec<ConnHandle>>> {
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the subscriber is connected (deliveries can reach sockets); part of `/ready`.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        (self.connected)()
    }

    /// Registers a connection and waits until its user's channel is subscribed. Fails at
    /// once while the subscriber is disconnected, instead of queueing behind Redis timeouts.
    ///
    /// # Errors
    /// [`RegisterError`] when the user has too many sockets or Redis cannot subscribe.
    pub async fn register(&self, user: &UserId, handle: ConnHandle) -> Result<(), RegisterError> {
        if !self.is_connected() {
            return Err(RegisterError::Subscribe("not connected".into()));
        }
        let id = handle.id;
        {
            let mut users = self.users();
            let conns = users.entry(user.clone()).or_default();
            if conns.len() >= self.max_per_user {
                return Err(RegisterError::TooManyConnections);
            }
            conns.push(handle);
        }
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(SubCmd::Subscribe(user.clone(), tx));
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.unregister(user, id);
                Err(RegisterError::Subscribe(e))
            }
            Err(_) => {
                self.unregister(user, id);
                Err(RegisterError::Subscribe("gateway shutting down".into()))
            }
        }
    }

    /// Removes a connection; the channel is unsubscribed when it was the user's last.
    pub fn unregister(&self, user: &UserId, id: u64) {
        let last = {
            let mut users = self.users();
            let Some(conns) = users.get_mut(user) else {
                return;
            };
            conns.retain(|c| c.id != id);
            if conns.is_empty() {
                users.remove(user);
                true
            } else {
                false
            }
        };
        if last {
            let _ = self.commands.send(SubCmd::Unsubscribe(user.clone()));
        }
    }

    fn has_connections(&self, user: &UserId) -> bool {
        self.users().contains_key(user)
    }

    /// Hands a published delivery to every socket of its user.
    pub fn dispatch(&self, delivery: Delivery) {
        let delivery = Arc::new(delivery);
        let users = self.users();
        let Some(conns) = users.get(&delivery.userid) else {
            return;
        };
        for conn in conns {
            // A connection that dropped a delivery must not take later ones before its replay
            // starts: writing a later event first would move its cursor past the dropped one.
            if conn.resync.in_gap() {
                continue;
            }
            match conn.tx.try_send(Outbound::Live(Arc::clone(&delivery))) {
                Ok(()) => {}
                // A slow socket: everything durable is in the inbox, so replay later instead of buffering without bound.
                Err(mpsc::error::TrySendError::Full(_)) => conn.resync.request(),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Stops live deliveries to every connection until it replays (a gap began).
    pub fn mark_gap_all(&self) {
        for conns in self.users().values() {
            for c in conns {
                c.resync.mark_gap();
            }
        }
    }

    /// Tells every connection to replay from its cursor (after a gap in the subscription).
    pub fn resync_all(&self) {
        for conns in self.users().values() {
            for c in conns {
                c.resync.request();
            }
        }
    }
}

async fn manage_subscriptions<C: Channels>(
    fanout: Arc<Fanout>,
    subscriber: Arc<C>,
    mut commands: mpsc::UnboundedReceiver<SubCmd>,
    shutdown: CancellationToken,
) {
    let mut subscribed: HashSet<UserId> = HashSet::new();
    loop {
        let cmd = tokio::select! {
            () = shutdown.cancelled() => return,
            cmd = commands.recv() => match cmd { Some(c) => c, None => return },
        };
        match cmd {
            SubCmd::Subscribe(user, reply) => {
                if subscribed.contains(&user) {
                    let _ = reply.send(Ok(()));
                    continue;
                }
                if !subscriber.is_connected() {
                    let _ = reply.send(Err("not connected".into()));
                    continue;
                }
                let channel = fanout.names.user_channel(&user);
                match subscriber.subscribe(channel).await {
                    Ok(()) => {
                        subscribed.insert(user);
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        SubscribeFailed {
                            userid: user.as_str(),
                            error: &e,
                        }
                        .emit();
                        let _ = reply.send(Err(e));
                    }
                }
            }
            SubCmd::Unsubscribe(user) => {
                if fanout.has_connections(&user) || !subscribed.remove(&user) {
                    continue;
                }
                if let Err(e) = subscriber
                    .unsubscribe(fanout.names.user_channel(&user))
                    .await
                {
                    UnsubscribeFailed {
                        userid: user.as_str(),
                        error: &e,
                    }
                    .emit();
                }
            }
            SubCmd::Resubscribe => {
                if resubscribe(&*subscriber, &shutdown).await {
                    fanout.resync_all();
                }
            }
        }
    }
}

/// Subscribes every tracked channel again, retrying with jittered, capped backoff; `false`
/// when shutdown came first.
async fn resubscribe<C: Channels>(subscriber: &C, shutdown: &CancellationToken) -> bool {
    let backoff = Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(5),
        max_attempts: u32::MAX,
    };
    let mut attempts = 0u32;
    loop {
        attempts = attempts.saturating_add(1);
        match subscriber.resubscribe_all().await {
            Ok(()) => return true,
            Err(e) => ResubscribeFailed {
                attempts,
                error: &e,
            }
            .emit(),
        }
        let delay = backoff
            .delay(attempts, None, &mut rand::rng())
            .unwrap_or(backoff.cap);
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn listen(fanout: Arc<Fanout>, subscriber: SubscriberClient, shutdown: CancellationToken) {
    let mut messages = subscriber.message_rx();
    let mut reconnects = subscriber.reconnect_rx();
    loop {
        // Biased, reconnects first: every message of a new connection comes after its reconnect
        // event, so the gap is marked before any later delivery is dispatched.
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            server = reconnects.recv() => {
                if let Ok(server) = server {
                    tracing::info!(%server, "Redis subscriber reconnected; re-subscribing, then every connection replays");
                    fanout.on_reconnect();
                }
            }
            msg = messages.recv() => match msg {
                Ok(msg) => {
                    let Some(payload) = msg.value.as_str() else { continue };
                    match serde_json::from_str::<Delivery>(&payload) {
                        Ok(d) => {
                            if fanout.names.user_of_channel(&msg.channel) .as_ref() == Some(&d.userid) {
                                fanout.dispatch(d);
                            }
                        }
                        Err(e) => tracing::warn!(channel = %msg.channel, error = %e, "unreadable delivery on channel"),
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "subscriber lagged; every connection replays");
                    fanout.resync_all();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use tokio::sync::Semaphore;

    use super::*;

    /// A subscriber whose re-subscribes wait for the test to let them through, and fail the
    /// first `fail_first` times.
    struct Scripted {
        resubscribe_gate: Arc<Semaphore>,
        fail_first: u32,
        resubscribes: Arc<AtomicU32>,
    }

    impl Channels for Scripted {
        fn is_connected(&self) -> bool {
            true
        }
        async fn subscribe(&self, _channel: String) -> Result<(), String> {
            Ok(())
        }
        async fn unsubscribe(&self, _channel: String) -> Result<(), String> {
            Ok(())
        }
        async fn resubscribe_all(&self) -> Result<(), String> {
            let permit = self
                .resubscribe_gate
                .acquire()
                .await
                .map_err(|e| e.to_string())?;
            permit.forget();
            let n = self.resubscribes.fetch_add(1, Ordering::SeqCst) + 1;
            if n <= self.fail_first {
                Err(format!("attempt {n} refused"))
            } else {
                Ok(())
            }
        }
    }

    struct Setup {
        fanout: Arc<Fanout>,
        resync: Arc<Resync>,
        gate: Arc<Semaphore>,
        resubscribes: Arc<AtomicU32>,
        _rx: mpsc::Receiver<Outbound>,
    }

    async fn setup(fail_first: u32) -> Setup {
        let gate = Arc::new(Semaphore::new(0));
        let resubscribes = Arc::new(AtomicU32::new(0));
        let channels = Scripted {
            resubscribe_gate: Arc::clone(&gate),
            fail_first,
            resubscribes: Arc::clone(&resubscribes),
        };
        let fanout = Fanout::start_with(channels, Names::default(), 4, CancellationToken::new());
        let (tx, rx) = mpsc::channel(8);
        let resync = Arc::new(Resync::default());
        let user = UserId::parse("alice").expect("a valid userid");
        fanout
            .register(
                &user,
                ConnHandle {
                    id: 1,
                    tx,
                    resync: Arc::clone(&resync),
                },
            )
            .await
            .expect("registered");
        Setup {
            fanout,
            resync,
            gate,
            resubscribes,
            _rx: rx,
        }
    }

    /// Whether the connection is asked to replay within `wait` (virtual time).
    async fn replay_requested(resync: &Resync, wait: Duration) -> bool {
        tokio::time::timeout(wait, resync.requested()).await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_reconnect_no_connection_replays_before_its_channel_is_subscribed_again() {
        let s = setup(0).await;
        s.fanout.on_reconnect();
        assert!(s.resync.in_gap(), "live deliveries stop at once");
        assert!(
            !replay_requested(&s.resync, Duration::from_secs(30)).await,
            "a replay was asked for while the re-subscribe was still running"
        );
        s.gate.add_permits(1);
        assert!(replay_requested(&s.resync, Duration::from_secs(1)).await);
        assert_eq!(s.resubscribes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_re_subscribe_is_retried_and_the_replay_waits_for_its_success() {
        let s = setup(3).await;
        s.fanout.on_reconnect();
        s.gate.add_permits(3);
        assert!(
            !replay_requested(&s.resync, Duration::from_secs(60)).await,
            "a replay was asked for after a failed re-subscribe"
        );
        assert_eq!(
            s.resubscribes.load(Ordering::SeqCst),
            3,
            "retried until the gate closed"
        );
        assert!(s.resync.in_gap(), "still no live deliveries");
        s.gate.add_permits(1);
        assert!(replay_requested(&s.resync, Duration::from_secs(10)).await);
        assert_eq!(s.resubscribes.load(Ordering::SeqCst), 4);
    }
}
