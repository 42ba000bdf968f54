//! Fan-out of deliveries to the sockets this gateway holds.
//!
//! One Redis subscriber connection per gateway multiplexes the `user:{U}` channels of every
//! user with a socket here: subscribed on the user's first socket, unsubscribed after the
//! last. Subscribe and unsubscribe commands go through one task, in order, so a user who
//! disconnects and reconnects at once never ends up unsubscribed. Whenever a connection may
//! have missed something (Redis reconnect, a lagging channel) it is told to resync, and
//! replays from the durable inbox stream.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fred::clients::SubscriberClient;
use fred::prelude::*;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use colloquy_core::names::Names;
use colloquy_core::records::Delivery;
use colloquy_core::wire::{EventId, ServerFrame};
use colloquy_core::{UserId, metrics as m};

/// What a session's writer receives.
#[derive(Debug)]
pub enum Outbound {
    /// A frame produced by this session (ack, error, pong).
    Frame(ServerFrame),
    /// A delivery published on the user's channel.
    Live(Arc<Delivery>),
    /// The result of reading the inbox after a cursor; `more` when the page was full.
    Replayed {
        deliveries: Vec<Delivery>,
        more: bool,
    },
    /// Reading the inbox failed; the session retries.
    ReplayFailed,
}

/// A signal that a connection may have missed deliveries and must replay.
#[derive(Debug, Default)]
pub struct Resync {
    pending: AtomicBool,
    notify: Notify,
}

impl Resync {
    pub fn request(&self) {
        self.pending.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Whether a resync was requested and not yet picked up by the session.
    #[must_use]
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Waits until a resync is requested and clears the request.
    pub async fn requested(&self) {
        loop {
            if self.pending.swap(false, Ordering::AcqRel) {
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
}

/// The registry of local connections and the subscriber behind it.
pub struct Fanout {
    names: Names,
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
        let (commands, rx) = mpsc::unbounded_channel();
        let fanout = Arc::new(Self {
            names,
            max_per_user,
            users: Mutex::new(HashMap::new()),
            commands,
        });
        tokio::spawn(manage_subscriptions(
            Arc::clone(&fanout),
            subscriber.clone(),
            rx,
            shutdown.clone(),
        ));
        tokio::spawn(listen(Arc::clone(&fanout), subscriber, shutdown));
        fanout
    }

    fn users(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, Vec<ConnHandle>>> {
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a connection and waits until its user's channel is subscribed.
    ///
    /// # Errors
    /// [`RegisterError`] when the user has too many sockets or Redis cannot subscribe.
    pub async fn register(&self, user: &UserId, handle: ConnHandle) -> Result<(), RegisterError> {
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

    /// Number of open connections this gateway holds.
    #[must_use]
    pub fn connection_count(&self) -> usize {
        self.users().values().map(Vec::len).sum()
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
            if conn.resync.is_pending() {
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

    /// Tells every connection to replay from its cursor (after a gap in the subscription).
    pub fn resync_all(&self) {
        for conns in self.users().values() {
            for c in conns {
                c.resync.request();
            }
        }
    }
}

async fn manage_subscriptions(
    fanout: Arc<Fanout>,
    subscriber: SubscriberClient,
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
                let channel = fanout.names.user_channel(&user);
                match subscriber.subscribe(channel).await {
                    Ok(()) => {
                        subscribed.insert(user);
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        metrics::counter!(m::REDIS_ERRORS, "service" => "gateway", "op" => "subscribe").increment(1);
                        tracing::warn!(userid = %user, error = %e, "subscribe failed");
                        let _ = reply.send(Err(e.to_string()));
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
                    metrics::counter!(m::REDIS_ERRORS, "service" => "gateway", "op" => "unsubscribe").increment(1);
                    tracing::warn!(userid = %user, error = %e, "unsubscribe failed");
                }
            }
        }
    }
}

async fn listen(fanout: Arc<Fanout>, subscriber: SubscriberClient, shutdown: CancellationToken) {
    let mut messages = subscriber.message_rx();
    let mut reconnects = subscriber.reconnect_rx();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
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
            server = reconnects.recv() => {
                if let Ok(server) = server {
                    tracing::info!(%server, "Redis subscriber reconnected; every connection replays");
                    fanout.resync_all();
                }
            }
        }
    }
}

/// Reads up to `limit` deliveries after `after` (exclusive) from a user's inbox.
///
/// # Errors
/// When Redis fails.
pub async fn read_inbox(
    redis: &Pool,
    names: &Names,
    user: &UserId,
    after: EventId,
    limit: u64,
) -> Result<Vec<Delivery>, fred::error::Error> {
    let entries: Vec<(String, HashMap<String, String>)> = redis
        .xrange(names.inbox_key(user), format!("({after}"), "+", Some(limit))
        .await?;
    let mut out = Vec::with_capacity(entries.len());
    for (id, fields) in entries {
        let Some(body) = fields.get(colloquy_core::records::INBOX_FIELD) else {
            continue;
        };
        match serde_json::from_str::<Delivery>(body) {
            Ok(mut d) => {
                d.event_id = Some(id);
                out.push(d);
            }
            Err(e) => {
                tracing::warn!(userid = %user, event_id = %id, error = %e, "unreadable inbox entry skipped")
            }
        }
    }
    Ok(out)
}
