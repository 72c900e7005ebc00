//! Group commit: many callers' writes in one durable transaction.

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle, ThreadId};

use super::tx::{OpenTables, Staged, WriteTx};
use super::{abort, Store, StoreError};

/// Group commit: many threads' writes, one durable transaction per batch.
///
/// A single committer thread takes up to `max_batch` queued closures, runs them one after the
/// other against one redb write transaction and commits once. A caller's `write` returns
/// only after the commit that holds its writes is durable (or with the error that stopped
/// it). While the committer waits on `fsync`, new callers queue up and form the next batch,
/// so the batch size adapts to the load without any timer.
///
/// Failure isolation: each closure writes into its own staging buffer (see the module notes);
/// the buffer is applied to the shared transaction only if the closure returns `Ok`. A closure
/// that returns an error or panics has its buffer dropped, so none of its writes or audit
/// events land, and its caller gets its error; the rest of the batch still commits. Later
/// closures in a batch see the applied writes of earlier ones, so `insert_new` stays unique
/// across a batch.
///
/// If the batch itself cannot be committed (begin, apply or commit fails), every caller in it
/// gets [`StoreError::GroupCommit`] with the shared cause, including callers whose closure was
/// rejected, since their decision was taken against state that did not become durable. After a
/// commit error the outcome is unknown (redb may have made it durable); the caller must not
/// acknowledge and should re-check after the store is reopened.
///
/// Async callers use [`GroupCommit::write_async`], which does not block a runtime thread; the
/// closure still runs on the committer thread, so it must be quick and must not block on the
/// runtime. Dropping the future does not cancel the write.
#[derive(Clone)]
pub struct GroupCommit {
    shared: Arc<GroupShared>,
    // Dropping the last handle stops the committer thread once the queue is drained.
    _owner: Arc<CommitterOwner>,
}

impl GroupCommit {
    /// Queues `f` and blocks until the batch holding it is durably committed.
    pub fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, outcome) = mpsc::sync_channel(1);
        self.submit(Box::new(GroupJobOf {
            f,
            reply: Reply::Blocking(reply),
        }))?;
        outcome.recv().map_err(|_| StoreError::CommitterGone)?
    }

    /// [`Self::write`] for async callers: awaits the durable commit without blocking a thread.
    pub async fn write_async<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.submit(Box::new(GroupJobOf {
            f,
            reply: Reply::Async(reply),
        }))?;
        outcome.await.map_err(|_| StoreError::CommitterGone)?
    }

    /// Closures queued and not yet taken into a batch.
    pub fn queued(&self) -> usize {
        self.shared.lock().jobs.len()
    }

    pub(super) fn start(store: Arc<Store>, max_batch: usize) -> Result<GroupCommit, StoreError> {
        let shared = Arc::new(GroupShared {
            store,
            max_batch,
            queue: Mutex::new(GroupQueue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let committer = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("store-group-commit".into())
            .spawn(move || committer.run())
            .map_err(StoreError::Spawn)?;
        let owner = Arc::new(CommitterOwner {
            shared: Arc::clone(&shared),
            thread_id: thread.thread().id(),
            thread: Mutex::new(Some(thread)),
        });
        Ok(GroupCommit {
            shared,
            _owner: owner,
        })
    }

    fn submit(&self, job: Box<dyn GroupJob>) -> Result<(), StoreError> {
        let mut queue = self.shared.lock();
        if queue.closed {
            return Err(StoreError::CommitterGone);
        }
        queue.jobs.push_back(job);
        drop(queue);
        self.shared.ready.notify_one();
        Ok(())
    }
}

struct GroupShared {
    store: Arc<Store>,
    max_batch: usize,
    queue: Mutex<GroupQueue>,
    ready: Condvar,
}

struct GroupQueue {
    jobs: VecDeque<Box<dyn GroupJob>>,
    closed: bool,
}

impl GroupShared {
    fn lock(&self) -> MutexGuard<'_, GroupQueue> {
        // The queue is only pushed to and drained under the lock, never left half-updated, so
        // a poisoned lock still guards a consistent queue.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(self: Arc<Self>) {
        // If this thread ends for any reason, refuse new work and drop what is queued, so no
        // caller waits forever: their reply channels close and they get CommitterGone.
        let _closer = CloseOnExit(&self);
        loop {
            let batch: Vec<Box<dyn GroupJob>> = {
                let mut queue = self.lock();
                while queue.jobs.is_empty() && !queue.closed {
                    queue = self
                        .ready
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if queue.jobs.is_empty() {
                    return;
                }
                let take = queue.jobs.len().min(self.max_batch);
                queue.jobs.drain(..take).collect()
            };
            self.commit_batch(batch);
        }
    }

    /// Runs and commits one batch. Any failure is answered to every caller of the batch and
    /// leaves nothing behind: the next batch begins a new transaction, on a reopened database
    /// if this failure closed it (see the engine's "Recovery" notes), so the committer heals
    /// by itself once the disk accepts writes again.
    fn commit_batch(&self, batch: Vec<Box<dyn GroupJob>>) {
        let size = batch.len();
        let (db, txn) = match self.store.begin_write() {
            Ok(begun) => begun,
            Err(err) => {
                log_failure(size, &err);
                let err = Arc::new(err);
                for job in batch {
                    job.finish_unrun(Arc::clone(&err));
                }
                return;
            }
        };
        let mut ran: Vec<Box<dyn GroupCompletion>> = Vec::with_capacity(size);
        // Each table opened once for the batch; the accepted closures' writes gathered in
        // `accepted` (later closures read them) and applied together, one audit append.
        let tables = OpenTables::new(&txn);
        let mut accepted = Staged::default();
        for job in batch {
            let mut tx = WriteTx::new(&tables, &accepted);
            let (completion, ok) = job.run(&mut tx);
            let staged = tx.staged;
            ran.push(completion);
            if ok {
                accepted.absorb(staged);
            }
        }
        let applied = accepted.apply(&tables, &txn);
        drop(tables);
        let outcome = match applied {
            Err(err) => {
                abort(txn);
                Err(Arc::new(self.store.failed(&db, err)))
            }
            Ok(()) => self.store.commit(&db, txn).map_err(Arc::new),
        };
        // Our clone of a handle that failed must go before the next batch reopens the file.
        drop(db);
        match &outcome {
            Ok(()) => tracing::debug!(batch = size, "store group commit"),
            Err(err) => log_failure(size, err),
        }
        for completion in ran {
            completion.finish(outcome.clone());
        }
    }
}

fn log_failure(batch: usize, err: &StoreError) {
    // Under a full disk every batch fails: a few lines per window, the rest counted.
    if crate::log_limit::allow("store.group") {
        tracing::error!(
            batch,
            error = %crate::error::chain(err),
            "store group commit failed; every caller of the batch is refused"
        );
    }
}

struct CloseOnExit<'a>(&'a GroupShared);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        let mut queue = self.0.lock();
        queue.closed = true;
        queue.jobs.clear();
    }
}

struct CommitterOwner {
    shared: Arc<GroupShared>,
    thread_id: ThreadId,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for CommitterOwner {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        // Join so that the store is released when the last handle goes (a reopen right after
        // must not find the file still held), unless the last handle was dropped by a closure
        // running on the committer thread itself; that thread then exits on its own.
        if thread::current().id() == self.thread_id {
            return;
        }
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!("the store group commit thread panicked");
            }
        }
    }
}

/// A queued closure, type-erased.
trait GroupJob: Send {
    /// Runs the closure against `tx`; returns how to answer the caller once the batch's
    /// outcome is known, and whether the closure's staged writes are to be applied.
    fn run(self: Box<Self>, tx: &mut WriteTx<'_>) -> (Box<dyn GroupCompletion>, bool);
    /// The batch failed before this closure ran.
    fn finish_unrun(self: Box<Self>, err: Arc<StoreError>);
}

trait GroupCompletion: Send {
    fn finish(self: Box<Self>, commit: Result<(), Arc<StoreError>>);
}

struct GroupJobOf<F, T> {
    f: F,
    reply: Reply<T>,
}

impl<F, T> GroupJob for GroupJobOf<F, T>
where
    F: FnOnce(&mut WriteTx<'_>) -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    fn run(self: Box<Self>, tx: &mut WriteTx<'_>) -> (Box<dyn GroupCompletion>, bool) {
        let GroupJobOf { f, reply } = *self;
        // Unwind safety: the closure only reaches the redb transaction through reads; its
        // writes go to `tx.staged`, which is discarded when it panics.
        let result = panic::catch_unwind(AssertUnwindSafe(|| f(tx)))
            .unwrap_or(Err(StoreError::ClosurePanicked));
        let accepted = result.is_ok();
        (Box::new(Completion { result, reply }), accepted)
    }

    fn finish_unrun(self: Box<Self>, err: Arc<StoreError>) {
        self.reply.send(Err(StoreError::GroupCommit(err)));
    }
}

struct Completion<T> {
    result: Result<T, StoreError>,
    reply: Reply<T>,
}

impl<T: Send + 'static> GroupCompletion for Completion<T> {
    fn finish(self: Box<Self>, commit: Result<(), Arc<StoreError>>) {
        let answer = match commit {
            Ok(()) => self.result,
            Err(err) => Err(StoreError::GroupCommit(err)),
        };
        self.reply.send(answer);
    }
}

enum Reply<T> {
    Blocking(mpsc::SyncSender<Result<T, StoreError>>),
    Async(tokio::sync::oneshot::Sender<Result<T, StoreError>>),
}

impl<T> Reply<T> {
    fn send(self, answer: Result<T, StoreError>) {
        // A caller that stopped waiting (a dropped future) no longer wants the answer; its
        // write stands or fails regardless.
        match self {
            Reply::Blocking(sender) => {
                let _ = sender.send(answer);
            }
            Reply::Async(sender) => {
                let _ = sender.send(answer);
            }
        }
    }
}
