//! Durable commit throughput of the store: every commit is fsynced (Durability::Immediate,
//! two-phase commit), every record carries an audit entry.
//!
//! The store lives under `CARGO_TARGET_TMPDIR` (inside `target/`, on the same filesystem as
//! the worktree), never on a tmpfs where fsync costs nothing.
//!
//! Run: `cargo bench --bench store`

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nfv_warden::store::{AuditEvent, Store, Table};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Record {
    subject: String,
    body: String,
}

const RECORDS: Table<Record> = Table::new("bench_records");

const SINGLE_N: usize = 2_000;
const GROUP_THREADS: usize = 8;
const GROUP_N: usize = 20_000;
const GROUP_MAX_BATCH: usize = 256;
const BATCH_RECORDS: usize = 64;
const BATCH_COMMITS: usize = 200;

fn main() {
    let base = env!("CARGO_TARGET_TMPDIR");
    let dir = tempfile::tempdir_in(base).expect("temp dir under CARGO_TARGET_TMPDIR");
    println!("store bench in {} (fsync per commit)", dir.path().display());

    // The JSON value is ~200 bytes.
    let record_size = serde_json::to_vec(&record("key-000000")).map_or(0, |v| v.len());
    println!("record: {record_size} bytes JSON + one audit entry each");

    {
        let store = Store::open(&dir.path().join("single.redb")).expect("open");
        let before = store.commit_count();
        let started = Instant::now();
        for i in 0..SINGLE_N {
            let key = format!("key-{i:06}");
            store
                .write(|tx| {
                    tx.put(&RECORDS, &key, &record(&key))?;
                    tx.audit(AuditEvent::new("bench", "record.put", key.as_str()));
                    Ok(())
                })
                .expect("write");
        }
        report(
            "1 record/commit",
            SINGLE_N,
            store.commit_count() - before,
            started.elapsed(),
        );
    }

    {
        let store = Arc::new(Store::open(&dir.path().join("group.redb")).expect("open"));
        let group = store.group_commit(GROUP_MAX_BATCH).expect("group commit");
        let per_thread = GROUP_N / GROUP_THREADS;
        let before = store.commit_count();
        let started = Instant::now();
        let writers: Vec<_> = (0..GROUP_THREADS)
            .map(|t| {
                let group = group.clone();
                thread::spawn(move || {
                    for i in 0..per_thread {
                        let key = format!("key-{t}-{i:06}");
                        group
                            .write(move |tx| {
                                tx.put(&RECORDS, &key, &record(&key))?;
                                tx.audit(AuditEvent::new("bench", "record.put", key.as_str()));
                                Ok(())
                            })
                            .expect("group write");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer thread");
        }
        let elapsed = started.elapsed();
        report(
            &format!("group commit, {GROUP_THREADS} threads"),
            per_thread * GROUP_THREADS,
            store.commit_count() - before,
            elapsed,
        );
    }

    {
        let store = Store::open(&dir.path().join("batch.redb")).expect("open");
        let before = store.commit_count();
        let started = Instant::now();
        for c in 0..BATCH_COMMITS {
            store
                .write(|tx| {
                    for i in 0..BATCH_RECORDS {
                        let key = format!("key-{c:04}-{i:02}");
                        tx.put(&RECORDS, &key, &record(&key))?;
                        tx.audit(AuditEvent::new("bench", "record.put", key.as_str()));
                    }
                    Ok(())
                })
                .expect("write");
        }
        report(
            &format!("{BATCH_RECORDS} records/commit"),
            BATCH_COMMITS * BATCH_RECORDS,
            store.commit_count() - before,
            started.elapsed(),
        );
        let started = Instant::now();
        let entries = store.verify_audit_chain().expect("audit chain");
        let elapsed = started.elapsed();
        println!(
            "store: verify_audit_chain: {entries} entries in {:.1} ms ({:.0} entries/s)",
            elapsed.as_secs_f64() * 1e3,
            entries as f64 / elapsed.as_secs_f64()
        );
    }
}

fn record(key: &str) -> Record {
    Record {
        subject: key.to_string(),
        body: "x".repeat(160),
    }
}

fn report(what: &str, records: usize, commits: u64, elapsed: Duration) {
    let secs = elapsed.as_secs_f64();
    println!(
        "store: {what}: {:.0} commits/s ({:.2} ms/commit), {:.0} records/s, {} records in {} commits (avg batch {:.1})",
        commits as f64 / secs,
        secs * 1e3 / commits as f64,
        records as f64 / secs,
        records,
        commits,
        records as f64 / commits as f64,
    );
}
