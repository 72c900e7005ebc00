//! The owner of the TPM connection: one thread drives the ESAPI context, callers hand it
//! commands and wait for the answer at most a deadline, and a supervisor replaces an owner
//! thread that stays stuck in the TPM.
//!
//! Why a supervisor: the swtpm and mssim TCTIs of libtss2 3.2 block in `read(2)` for the
//! response (their receive refuses any timeout but "block", ESYS's synchronous calls ask for
//! "block" anyway, and tss-esapi 7.7 exposes neither `Esys_SetTimeout` nor the socket). A
//! stopped or hung TPM therefore holds the owner thread for as long as it hangs, and nothing
//! can interrupt it. So nothing waits on that thread without a bound:
//!
//! - a caller waits for its answer at most the command deadline (`command_timeout_ms`,
//!   `keygen_timeout_ms` for key generation), then gets [`KeyError::Unavailable`];
//! - when the command in flight passes its deadline, the supervisor abandons that owner
//!   thread (it exits whenever its read returns, sending nothing more to the TPM, and its
//!   result is discarded), fails every queued command at once, marks the TPM down, and starts
//!   a new owner thread that reconnects with backoff;
//! - while the TPM is down, commands fail immediately with `Unavailable` naming the cause,
//!   until a reconnection has answered a command (TPM2_GetCapability of the transient
//!   handles, which are then flushed: the abandoned connection may have left one loaded);
//! - at most `max_waiting_commands` callers wait on the TPM at a time, so callers blocked on
//!   a hung TPM can never fill a thread pool that other work needs. More callers wait for a
//!   slot only while the TPM keeps answering (its command in flight is younger than
//!   [`STALL`]); once it stalls they fail at once;
//! - a fresh connection helps when only the old connection hung (a half-open connection);
//!   when the reconnection hangs too, the TPM itself hangs. And a TPM without a resource
//!   manager (swtpm, mssim) serves one connection at a time, so a new connection is served
//!   only after the stuck one anyway. In both cases the supervisor waits until the abandoned
//!   thread comes back (the TPM answers again) or a long pause passes (six command
//!   deadlines) before it tries again, and never keeps more than [`MAX_ABANDONED`]
//!   abandoned threads alive, each blocked on one socket to the TPM. Piling up connections
//!   would not help and hurts: swtpm listens with a backlog of 1, so connection attempts
//!   refused during the stall come back only on TCP's SYN retransmission timer (1 s, 3 s,
//!   ...), competing with the recovered connection. When an abandoned thread's read returns
//!   it sends nothing more and finalizes its context (closing its socket, freeing its
//!   memory; see `Worker::close`);
//! - the supervisor sleeps until the deadline of the command in flight; a command whose
//!   deadline comes earlier (a signature after a key generation) wakes it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::connection::{explain, Target, Worker};
use crate::keys::KeyError;

/// Deadlines and the bound on waiting callers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    pub command: Duration,
    pub keygen: Duration,
    pub max_waiting: usize,
}

/// Which deadline a command gets.
#[derive(Clone, Copy, Debug)]
pub(super) enum Deadline {
    /// Every command but key generation.
    Command,
    /// TPM2_Create / TPM2_CreatePrimary: an RSA key takes a hardware TPM seconds.
    KeyGeneration,
}

impl Limits {
    fn of(&self, deadline: Deadline) -> Duration {
        match deadline {
            Deadline::Command => self.command,
            Deadline::KeyGeneration => self.keygen,
        }
    }
}

/// A command in flight for longer than this counts as a stall: callers beyond
/// `max_waiting` stop waiting for a slot (a TPM command normally takes 1-300 ms).
pub(super) const STALL: Duration = Duration::from_millis(500);

/// What an owner thread is busy with while it (re)connects.
const CONNECTING: &str = "connecting to the TPM";

/// After a reconnection hung, wait this many command deadlines before the next attempt
/// (unless an abandoned thread comes back first).
const HUNG_RECONNECT_PAUSE: u32 = 6;

/// Abandoned owner threads that may be alive at once (each holds one stuck connection).
pub(super) const MAX_ABANDONED: usize = 3;

const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// The callers' side: queue a command, wait for its answer within its deadline.
pub(super) struct Owner {
    shared: Arc<Shared>,
    supervisor: Option<JoinHandle<()>>,
}

type Job = Box<dyn FnOnce(&mut Worker, Instant) + Send>;

struct Shared {
    state: Mutex<State>,
    /// Owner threads wait here for jobs (and reconnection pauses end here early).
    jobs: Condvar,
    /// The supervisor and `Drop` wait here.
    watch: Condvar,
    /// Callers beyond `max_waiting` wait here for a slot.
    slots: Condvar,
    limits: Limits,
    target: Arc<Target>,
}

struct State {
    queue: VecDeque<Queued>,
    next_id: u64,
    /// Generation of the current owner thread; older generations are abandoned.
    generation: u64,
    /// The current owner thread's abandon flag, while it runs.
    owner: Option<Arc<AtomicBool>>,
    /// What the current owner thread is waiting for the TPM on, and until when.
    busy: Option<Busy>,
    health: Health,
    abandoned_alive: usize,
    /// Until when the supervisor sleeps (it holds the lock whenever it is not asleep, so
    /// others only ever see it asleep). A new `busy` whose deadline comes earlier must wake
    /// it: see [`Shared::watch_deadline`].
    supervisor: Sleep,
    /// Callers holding a slot (queued or in flight), at most `max_waiting`.
    waiting: usize,
    /// Callers waiting for a slot.
    waiting_for_slot: usize,
    /// After a reconnection hung: no new owner thread before this, unless an abandoned
    /// thread comes back first.
    respawn_after: Option<Instant>,
    stopping: bool,
}

struct Queued {
    id: u64,
    operation: &'static str,
    deadline: Deadline,
    job: Job,
}

/// How the supervisor sleeps.
#[derive(Clone, Copy, Debug)]
enum Sleep {
    /// Until something wakes it (nothing to watch).
    Untimed,
    /// Until this instant, unless woken earlier.
    Until(Instant),
}

struct Busy {
    what: &'static str,
    started: Instant,
    deadline: Instant,
    limit: Duration,
}

#[derive(Clone, Debug)]
enum Health {
    /// The first connection is being made: commands queue.
    Starting,
    Up,
    /// Commands fail at once with this reason until a reconnection succeeds.
    Down(String),
}

impl Owner {
    pub fn start(target: Target, limits: Limits) -> Result<Owner, KeyError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                next_id: 0,
                generation: 0,
                owner: None,
                busy: None,
                health: Health::Starting,
                abandoned_alive: 0,
                supervisor: Sleep::Untimed,
                waiting: 0,
                waiting_for_slot: 0,
                respawn_after: None,
                stopping: false,
            }),
            jobs: Condvar::new(),
            watch: Condvar::new(),
            slots: Condvar::new(),
            limits,
            target: Arc::new(target),
        });
        spawn_owner(&shared, &mut shared.lock())?;
        let watched = shared.clone();
        let supervisor = std::thread::Builder::new()
            .name("tpm-supervisor".to_string())
            .spawn(move || supervise(&watched));
        let supervisor = match supervisor {
            Ok(handle) => handle,
            Err(e) => {
                shared.stop();
                return Err(KeyError::TpmOther(format!(
                    "cannot start the TPM supervisor thread: {e}"
                )));
            }
        };
        Ok(Owner {
            shared,
            supervisor: Some(supervisor),
        })
    }

    /// Run `job` on the owner thread and wait for its answer at most the deadline of its
    /// kind. `Unavailable` at once when the TPM is down or too many callers already wait.
    pub fn call<T, F>(
        &self,
        operation: &'static str,
        deadline: Deadline,
        job: F,
    ) -> Result<T, KeyError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Worker, Instant) -> Result<T, KeyError> + Send + 'static,
    {
        let limit = self.shared.limits.of(deadline);
        let until = Instant::now() + limit;
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |worker, deadline| {
            // The caller may have gone away (deadline passed); the answer is dropped then.
            let _ = reply.send(job(worker, deadline));
        });
        let id = {
            let mut state = self.shared.slot(operation, until)?;
            let id = state.next_id;
            state.next_id += 1;
            state.queue.push_back(Queued {
                id,
                operation,
                deadline,
                job,
            });
            id
        };
        let _slot = Slot(&self.shared);
        self.shared.jobs.notify_all();
        match answer.recv_timeout(limit) {
            Ok(result) => result,
            // The job was dropped unrun: the TPM went down (or the store is closing).
            Err(RecvTimeoutError::Disconnected) => Err(KeyError::Unavailable {
                device: self.shared.target.device(),
                operation,
                reason: self.shared.down_reason(),
            }),
            Err(RecvTimeoutError::Timeout) => {
                let queued = {
                    let mut state = self.shared.lock();
                    let before = state.queue.len();
                    state.queue.retain(|q| q.id != id);
                    state.queue.len() != before
                };
                // The answer may have come in between the timeout and the lock.
                if let Ok(result) = answer.try_recv() {
                    return result;
                }
                let waited = limit.as_millis();
                Err(KeyError::Unavailable {
                    device: self.shared.target.device(),
                    operation,
                    reason: if queued {
                        format!("the TPM did not take the command within {waited} ms (busy)")
                    } else {
                        format!("no answer from the TPM within {waited} ms")
                    },
                })
            }
        }
    }
}

impl Owner {
    /// Why the TPM counts as down (commands fail at once), or `None` while it is up.
    pub fn down_reason(&self) -> Option<String> {
        match &self.shared.lock().health {
            Health::Down(reason) => Some(reason.clone()),
            Health::Starting | Health::Up => None,
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.stop();
        if let Some(supervisor) = self.supervisor.take() {
            let _ = supervisor.join();
        }
        // Let the current owner thread close its connection (a new store on the same TPM may
        // follow), but never wait on a TPM that hangs: past the deadline it is left to exit
        // on its own.
        let until = Instant::now() + self.shared.limits.command;
        let mut state = self.shared.lock();
        while state.owner.is_some() {
            let now = Instant::now();
            if now >= until {
                break;
            }
            state = self
                .shared
                .watch
                .wait_timeout(state, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// A caller's slot among the `max_waiting` (taken by [`Shared::slot`]); released on drop.
struct Slot<'a>(&'a Shared);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.waiting = state.waiting.saturating_sub(1);
        if state.waiting_for_slot > 0 {
            self.0.slots.notify_one();
        }
    }
}

fn stopped(device: String, operation: &'static str) -> KeyError {
    KeyError::Unavailable {
        device,
        operation,
        reason: "the TPM key store is closing".to_string(),
    }
}

impl Shared {
    /// The state lock. No code panics while holding it (jobs run outside it), so a poisoned
    /// lock still guards consistent state and is used as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take a slot among the `max_waiting` for a caller whose deadline is `until`: at once
    /// when one is free; otherwise wait for one while the TPM keeps answering. Fails at once
    /// while the TPM is down or the store is closing. On success the state is still locked
    /// and the caller must queue its job and then hold a [`Slot`].
    fn slot(
        &self,
        operation: &'static str,
        until: Instant,
    ) -> Result<MutexGuard<'_, State>, KeyError> {
        let max = self.limits.max_waiting;
        let mut state = self.lock();
        loop {
            if state.stopping {
                return Err(stopped(self.target.device(), operation));
            }
            if let Health::Down(reason) = &state.health {
                return Err(KeyError::Unavailable {
                    device: self.target.device(),
                    operation,
                    reason: reason.clone(),
                });
            }
            if state.waiting < max {
                state.waiting += 1;
                return Ok(state);
            }
            let now = Instant::now();
            let stalled = state
                .busy
                .as_ref()
                .is_some_and(|busy| now.duration_since(busy.started) >= STALL);
            if stalled || now >= until {
                return Err(KeyError::Unavailable {
                    device: self.target.device(),
                    operation,
                    reason: format!(
                        "{max} TPM commands are already waiting (max_waiting_commands) and \
                         the TPM is not keeping up"
                    ),
                });
            }
            state.waiting_for_slot += 1;
            state = self
                .slots
                .wait_timeout(state, (until - now).min(STALL))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            state.waiting_for_slot -= 1;
        }
    }

    fn stop(&self) {
        {
            let mut state = self.lock();
            state.stopping = true;
            state.queue.clear();
        }
        self.jobs.notify_all();
        self.watch.notify_all();
        self.slots.notify_all();
    }

    fn down_reason(&self) -> String {
        let state = self.lock();
        match &state.health {
            Health::Down(reason) => reason.clone(),
            _ if state.stopping => "the TPM key store is closing".to_string(),
            _ => "the TPM connection was reset".to_string(),
        }
    }

    /// Mark `generation` as waiting on the TPM for `what` until `limit` from now; false when
    /// that generation was abandoned or the store is closing.
    fn begin(&self, generation: u64, what: &'static str, limit: Duration) -> bool {
        let mut state = self.lock();
        if state.stopping || state.generation != generation {
            return false;
        }
        let started = Instant::now();
        state.busy = Some(Busy {
            what,
            started,
            deadline: started + limit,
            limit,
        });
        self.watch_deadline(&state, started + limit);
        true
    }

    /// Wake the supervisor when it would otherwise sleep past `deadline`, the deadline of the
    /// command just taken: it sleeps until the deadline of the command it last saw, and a
    /// command with a shorter deadline may follow (a signature, 5 s, after a key generation,
    /// 60 s). Without this a signature stuck in a hung TPM right after a key generation was
    /// noticed only at the key generation's deadline (tests/tpm_faults.rs
    /// `a_hang_right_after_a_key_generation_is_noticed_at_the_command_deadline`).
    fn watch_deadline(&self, state: &State, deadline: Instant) {
        let sleeps_past = match state.supervisor {
            Sleep::Untimed => true,
            Sleep::Until(wake) => wake > deadline,
        };
        if sleeps_past {
            self.watch.notify_all();
        }
    }

    /// The TPM answered; false when the answer came too late (the generation was abandoned).
    fn end(&self, generation: u64) -> bool {
        let mut state = self.lock();
        if state.generation != generation {
            return false;
        }
        state.busy = None;
        true
    }

    /// The next job for `generation` (waiting for one), marked busy; `None` when that
    /// generation was abandoned or the store is closing.
    fn next_job(&self, generation: u64) -> Option<(Job, Instant)> {
        let mut state = self.lock();
        loop {
            if state.stopping || state.generation != generation {
                return None;
            }
            if let Some(queued) = state.queue.pop_front() {
                let limit = self.limits.of(queued.deadline);
                let started = Instant::now();
                let deadline = started + limit;
                state.busy = Some(Busy {
                    what: queued.operation,
                    started,
                    deadline,
                    limit,
                });
                self.watch_deadline(&state, deadline);
                return Some((queued.job, deadline));
            }
            state = self
                .jobs
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The connection of `generation` is up.
    fn up(&self, generation: u64) {
        let mut state = self.lock();
        if state.generation != generation {
            return;
        }
        if let Health::Down(reason) = &state.health {
            tracing::info!(tcti = %self.target.tcti_text, was = %reason, "TPM connection re-established");
            crate::metrics::global().device_recovery(crate::keys::BackendKind::Tpm);
        }
        state.health = Health::Up;
    }

    /// The connection of `generation` is lost: down with `reason`, queued commands fail.
    fn down(&self, generation: u64, reason: String) {
        let mut state = self.lock();
        if state.generation != generation {
            return;
        }
        if !matches!(&state.health, Health::Down(_)) {
            tracing::error!(tcti = %self.target.tcti_text, reason = %reason, "TPM unavailable; reconnecting with backoff");
            crate::metrics::global().device_error(crate::keys::BackendKind::Tpm);
        }
        state.health = Health::Down(reason);
        // Dropping a job drops its reply channel: its caller fails at once; so do callers
        // waiting for a slot.
        state.queue.clear();
        self.slots.notify_all();
    }

    /// Sleep `delay` before the next reconnection; false when `generation` was abandoned or
    /// the store is closing.
    fn pause(&self, generation: u64, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        let mut state = self.lock();
        loop {
            if state.stopping || state.generation != generation {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            state = self
                .jobs
                .wait_timeout(state, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// An owner thread ends.
    fn exited(&self, generation: u64) {
        let mut state = self.lock();
        if state.generation == generation {
            state.owner = None;
            state.busy = None;
        } else {
            // Its TPM call returned: the TPM answers again, so reconnect now.
            state.abandoned_alive = state.abandoned_alive.saturating_sub(1);
            state.respawn_after = None;
        }
        self.watch.notify_all();
    }
}

fn spawn_owner(shared: &Arc<Shared>, state: &mut State) -> Result<(), KeyError> {
    let generation = state.generation;
    let abandoned = Arc::new(AtomicBool::new(false));
    let flag = abandoned.clone();
    let owned = shared.clone();
    std::thread::Builder::new()
        .name(format!("tpm-owner-{generation}"))
        .spawn(move || owner_thread(&owned, generation, flag))
        .map_err(|e| KeyError::TpmOther(format!("cannot start a TPM owner thread: {e}")))?;
    state.owner = Some(abandoned);
    Ok(())
}

/// The supervisor: abandons an owner thread whose TPM call passed its deadline, and starts
/// the next owner thread once no more than [`MAX_ABANDONED`] abandoned ones are alive.
fn supervise(shared: &Arc<Shared>) {
    let mut state = shared.lock();
    loop {
        if state.stopping {
            return;
        }
        let now = Instant::now();
        if let Some(busy) = &state.busy {
            if now < busy.deadline {
                let until = busy.deadline;
                state = sleep(shared, state, Sleep::Until(until));
                continue;
            }
            let reason = format!(
                "{} got no answer from the TPM within {} ms; the connection was abandoned and \
                 is being rebuilt",
                busy.what,
                busy.limit.as_millis()
            );
            tracing::error!(tcti = %shared.target.tcti_text, reason = %reason, "TPM hung");
            // One device error per loss, as in `down` (a reconnection that hangs again while
            // the TPM is already down is the same outage).
            if !matches!(state.health, Health::Down(_)) {
                crate::metrics::global().device_error(crate::keys::BackendKind::Tpm);
            }
            // A TPM without a resource manager (swtpm, mssim) serves one connection at a
            // time: a new one is served only after the stuck one, so wait for it to come back.
            // So does a reconnection that hung: the TPM itself hangs, not a connection.
            if busy.what == CONNECTING || shared.target.shares_transients() {
                state.respawn_after = Some(now + shared.limits.command * HUNG_RECONNECT_PAUSE);
            }
            abandon(&mut state, reason);
            shared.jobs.notify_all();
            shared.slots.notify_all();
            continue;
        }
        if state.owner.is_none() && state.abandoned_alive < MAX_ABANDONED {
            if let Some(after) = state.respawn_after {
                if now < after {
                    state = sleep(shared, state, Sleep::Until(after));
                    continue;
                }
                state.respawn_after = None;
            }
            if let Err(e) = spawn_owner(shared, &mut state) {
                state.health = Health::Down(e.to_string());
                state = sleep(shared, state, Sleep::Until(now + RECONNECT_MAX));
            }
            continue;
        }
        state = sleep(shared, state, Sleep::Untimed);
    }
}

/// The supervisor sleeps as `how` (recorded in the state, so that a command with an earlier
/// deadline wakes it: [`Shared::watch_deadline`]), or until woken.
fn sleep<'a>(
    shared: &'a Shared,
    mut state: MutexGuard<'a, State>,
    how: Sleep,
) -> MutexGuard<'a, State> {
    state.supervisor = how;
    match how {
        Sleep::Untimed => shared
            .watch
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner),
        Sleep::Until(wake) => {
            let wait = wake.saturating_duration_since(Instant::now());
            shared
                .watch
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0
        }
    }
}

/// Give up on the current owner thread: it may stay stuck in the TPM for good.
fn abandon(state: &mut State, reason: String) {
    if let Some(flag) = state.owner.take() {
        flag.store(true, Ordering::Release);
        state.abandoned_alive += 1;
    }
    state.generation += 1;
    state.busy = None;
    state.health = Health::Down(reason);
    state.queue.clear();
}

/// One owner thread: connect (with backoff), then run jobs until abandoned, stopped, or the
/// connection is lost (then back to connecting).
fn owner_thread(shared: &Arc<Shared>, generation: u64, abandoned: Arc<AtomicBool>) {
    let mut worker = Worker::new(shared.target.clone(), abandoned);
    let mut delay: Option<Duration> = None;
    'connect: loop {
        // Connect: the reconnection has to answer a real command (the transient flush) to
        // count as up; a stopped swtpm still accepts TCP connections.
        loop {
            if let Some(wait) = delay {
                if !shared.pause(generation, wait) {
                    break 'connect;
                }
            }
            if !shared.begin(generation, CONNECTING, shared.limits.command) {
                break 'connect;
            }
            let connected = worker.connect();
            if !shared.end(generation) {
                break 'connect;
            }
            match connected {
                Ok(()) => {
                    shared.up(generation);
                    break;
                }
                Err(e) => {
                    shared.down(
                        generation,
                        format!(
                            "cannot connect to TPM '{}': {}",
                            shared.target.tcti_text,
                            explain(&e)
                        ),
                    );
                    delay = Some(next_delay(delay));
                }
            }
        }
        // Serve.
        loop {
            let Some((job, deadline)) = shared.next_job(generation) else {
                break 'connect;
            };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                job(&mut worker, deadline)
            }));
            if outcome.is_err() {
                // The job's reply channel is gone, so its caller gets Unavailable. Start from
                // a fresh context: the old one may be mid-command.
                tracing::error!("TPM command panicked; resetting the TPM connection");
                worker.connection = None;
                worker.lost = Some("a TPM command panicked".to_string());
            }
            if !shared.end(generation) {
                break 'connect;
            }
            if worker.connection.is_none() {
                let reason = worker
                    .lost
                    .take()
                    .unwrap_or_else(|| "the TPM connection was lost".to_string());
                shared.down(generation, reason);
                delay = Some(RECONNECT_FIRST);
                continue 'connect;
            }
        }
    }
    worker.close();
    shared.exited(generation);
}

fn next_delay(delay: Option<Duration>) -> Duration {
    match delay {
        None => RECONNECT_FIRST,
        Some(d) => (d * 2).min(RECONNECT_MAX),
    }
}
