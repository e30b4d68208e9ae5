//! A closed-loop load driver, generic over the key-value store under test.
//!
//! "Closed loop" means each worker has exactly one request in flight: it sends
//! a put, waits for the acknowledgement, and only then sends the next one. With
//! `C` workers the store therefore sees at most `C` concurrent writes, and
//! throughput is what the store can sustain at that concurrency rather than how
//! fast a client can queue work.
//!
//! The driver knows nothing about etcd or flotilla: a store plugs in by
//! implementing [`KvTarget`] (how to open a connection) and [`KvWorker`] (how to
//! put one key over that connection).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A boxed, sendable future: what the trait methods below return, so that
/// `dyn KvTarget` and `dyn KvWorker` stay object safe without a macro crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A store the driver can load: a factory of per-worker connections.
///
/// The benchmark gives every worker its own connection so that concurrency in
/// the driver is concurrency on the wire, the same for every store.
pub trait KvTarget: Send + Sync {
    /// Short name used in reports, e.g. `"etcd"`.
    fn name(&self) -> &str;

    /// Opens one client connection for one worker.
    fn connect(&self) -> BoxFuture<'_, Result<Box<dyn KvWorker>>>;
}

/// One worker's connection to the store under test.
pub trait KvWorker: Send + 'static {
    /// Writes `value` under `key` and returns once the store has acknowledged
    /// it (for both stores under test, that means committed by a quorum).
    fn put(&mut self, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<()>>;
}

/// What to run: the shape of one measurement.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Number of concurrent workers, each with its own connection.
    pub clients: usize,
    /// Time spent writing before measuring, so connections, leader caches and
    /// the store's own buffers are warm. Nothing from it is reported.
    pub warmup: Duration,
    /// Length of the measured window.
    pub duration: Duration,
    /// Size in bytes of every value written.
    pub value_size: usize,
    /// A put that takes longer than this counts as an error, so a stuck store
    /// cannot hang the benchmark.
    pub op_timeout: Duration,
    /// Distinguishes this run's keys from earlier runs against the same store.
    pub key_prefix: String,
}

/// The outcome of one measurement.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// Number of concurrent workers that produced it.
    pub clients: usize,
    /// Puts acknowledged within the measured window.
    pub writes: u64,
    /// Failed or timed-out puts started within the measured window.
    pub errors: u64,
    /// `writes` divided by the window's length.
    pub writes_per_sec: f64,
    /// Median latency of successful puts started in the window.
    pub p50: Duration,
    /// 99th-percentile latency of successful puts started in the window.
    pub p99: Duration,
    /// Largest latency of a successful put started in the window.
    pub max: Duration,
}

/// What one worker brings back to the driver.
struct WorkerTally {
    /// Latencies of successful puts that started inside the window.
    latencies: Vec<Duration>,
    /// Successful puts that completed inside the window.
    completed_in_window: u64,
    /// Failed puts that started inside the window.
    errors: u64,
}

/// Runs `spec.clients` workers against `target` for warm-up plus duration and
/// reports throughput and latency percentiles.
///
/// Accounting: throughput counts puts *acknowledged* inside the window;
/// latency samples are the puts *started* inside the window (the last one of
/// each worker may finish just after it). Workers stop issuing at the window's
/// end, so the run is bounded by `warmup + duration + op_timeout`.
pub async fn run(target: &dyn KvTarget, spec: &LoadSpec) -> Result<LoadReport> {
    if spec.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let mut workers = Vec::with_capacity(spec.clients);
    for i in 0..spec.clients {
        let worker = target
            .connect()
            .await
            .with_context(|| format!("connecting worker {i} to {}", target.name()))?;
        workers.push(worker);
    }

    let start = Instant::now();
    let window_start = start + spec.warmup;
    let window_end = window_start + spec.duration;
    let value = vec![b'x'; spec.value_size];

    let mut tasks = Vec::with_capacity(workers.len());
    for (i, worker) in workers.into_iter().enumerate() {
        let key_prefix = format!("{}/{i}/", spec.key_prefix);
        let value = value.clone();
        let op_timeout = spec.op_timeout;
        tasks.push(tokio::spawn(async move {
            drive_worker(
                worker,
                key_prefix,
                value,
                op_timeout,
                window_start,
                window_end,
            )
            .await
        }));
    }

    let mut latencies = Vec::new();
    let mut writes = 0;
    let mut errors = 0;
    for task in tasks {
        let tally = task.await.context("a load worker panicked")?;
        latencies.extend(tally.latencies);
        writes += tally.completed_in_window;
        errors += tally.errors;
    }
    latencies.sort_unstable();

    Ok(LoadReport {
        clients: spec.clients,
        writes,
        errors,
        writes_per_sec: writes as f64 / spec.duration.as_secs_f64(),
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        max: latencies.last().copied().unwrap_or_default(),
    })
}

/// One worker's loop: sequential puts to fresh keys until the window closes.
async fn drive_worker(
    mut worker: Box<dyn KvWorker>,
    key_prefix: String,
    value: Vec<u8>,
    op_timeout: Duration,
    window_start: Instant,
    window_end: Instant,
) -> WorkerTally {
    let mut tally = WorkerTally {
        latencies: Vec::new(),
        completed_in_window: 0,
        errors: 0,
    };
    let mut seq: u64 = 0;
    loop {
        let sent = Instant::now();
        if sent >= window_end {
            return tally;
        }
        let key = format!("{key_prefix}{seq:010}");
        seq += 1;
        let outcome = tokio::time::timeout(op_timeout, worker.put(key, value.clone())).await;
        let acked = Instant::now();
        let in_window = sent >= window_start;
        match outcome {
            Ok(Ok(())) => {
                if in_window {
                    tally.latencies.push(acked - sent);
                }
                if acked >= window_start && acked <= window_end {
                    tally.completed_in_window += 1;
                }
            }
            Ok(Err(_)) | Err(_) => {
                if in_window {
                    tally.errors += 1;
                }
                // Do not spin on a store that is refusing every request.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// The `p`-th percentile of `sorted` by the nearest-rank method: the smallest
/// sample such that at least `p` percent of samples are less than or equal to
/// it. Exact (no histogram buckets); zero for an empty slice.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&samples, 50.0), ms(50));
        assert_eq!(percentile(&samples, 99.0), ms(99));
        assert_eq!(percentile(&samples, 100.0), ms(100));
        assert_eq!(percentile(&[ms(7)], 99.0), ms(7));
        assert_eq!(percentile(&[ms(1), ms(2), ms(3)], 50.0), ms(2));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    /// A store that acknowledges every put after a fixed delay.
    struct Sleepy(Duration);

    struct SleepyWorker(Duration);

    impl KvTarget for Sleepy {
        fn name(&self) -> &str {
            "sleepy"
        }
        fn connect(&self) -> BoxFuture<'_, Result<Box<dyn KvWorker>>> {
            let delay = self.0;
            Box::pin(async move { Ok(Box::new(SleepyWorker(delay)) as Box<dyn KvWorker>) })
        }
    }

    impl KvWorker for SleepyWorker {
        fn put(&mut self, _key: String, _value: Vec<u8>) -> BoxFuture<'_, Result<()>> {
            let delay = self.0;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn closed_loop_throughput_matches_latency() {
        let spec = LoadSpec {
            clients: 4,
            warmup: ms(50),
            duration: ms(500),
            value_size: 16,
            op_timeout: Duration::from_secs(1),
            key_prefix: "t".into(),
        };
        let report = run(&Sleepy(ms(10)), &spec).await.unwrap();
        // 4 workers x ~50 puts each in 500 ms; allow for timer slack.
        assert!(report.writes > 120 && report.writes <= 204, "{report:?}");
        assert!(report.p50 >= ms(10) && report.p50 < ms(30), "{report:?}");
        assert_eq!(report.errors, 0);
    }
}
