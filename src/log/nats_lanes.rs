//! Group commit for the JetStream log: concurrent requests' small messages of one partition that carry
//! no `Nats-Msg-Id` become one message.
//!
//! Each partition has a lane: a queue of groups, each group the payloads of several requests (their log
//! lines, one after the other) and one answer channel per request. At most [`MAX_IN_FLIGHT`] messages of a
//! lane are waiting for JetStream's acknowledgement; a request that arrives meanwhile joins the last group
//! still queued (while it stays within the message budget), so under load a message carries as many
//! requests as arrived during one acknowledgement, and an idle lane publishes a lone request at once.
//!
//! What this keeps, and why only id-less messages take part:
//! - a 200 still means JetStream acknowledged the message holding the request's lines: each request waits
//!   for its own group's acknowledgement, and a failed group fails every request in it (and no other);
//! - every retry is still recognised as before: a message with a `Nats-Msg-Id` (every event has an id)
//!   is never grouped, so JetStream drops its resent copy as it always did. Id-less events had no
//!   message id to lose: a request retried after a 503 may count twice with or without grouping;
//! - a request's lines stay together and in order in one message, and a request answered before another
//!   is sent is stored before it.
//!
//! The publishing runs in a task the first waiting request starts, not in a request's own future: a
//! client that disconnects (its handler dropped) cannot stall the lane or the requests grouped with it.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// Messages of one partition published and not yet acknowledged, at most. One makes the largest groups:
/// with 64 connections sending single events of one partition, 19 requests per message and 66,000-68,000
/// requests/s, against 12 and 64,000-66,000 with two in flight and 7 and 61,000-62,000 with four
/// (`nats_ingest_single`, same machine and run).
pub const MAX_IN_FLIGHT: usize = 1;

/// Largest payload of a message that may be grouped: single events and small batches. A request's larger
/// group is a message of its own, as before (batches are already one message per partition).
pub const GROUP_BELOW_BYTES: usize = 16 * 1024;

/// Why a group's publish failed: what the requests in it answer.
#[derive(Debug, Clone)]
pub struct PublishFailed {
    /// JetStream said the stream does not exist (deleted): the log forgets it.
    pub stream_not_found: bool,
    pub error: String,
}

/// What publishes one message and waits for its acknowledgement: JetStream in the server, a fake in tests.
pub trait Publisher: Clone + Send + Sync + 'static {
    fn publish(&self, subject: String, payload: Vec<u8>) -> impl Future<Output = Result<(), PublishFailed>> + Send;
}

struct Group {
    payload: Vec<u8>,
    waiters: Vec<oneshot::Sender<Result<(), PublishFailed>>>,
}

#[derive(Default)]
struct Lane {
    queue: VecDeque<Group>,
    in_flight: usize,
}

/// The lanes of a partitioned log, one per partition.
pub struct Lanes<P: Publisher> {
    publisher: P,
    subjects: Vec<String>,
    lanes: Vec<Arc<Mutex<Lane>>>,
    /// How long one publish may take before the lane fails its group and moves on.
    timeout: Duration,
}

impl<P: Publisher> Lanes<P> {
    pub fn new(publisher: P, subjects: Vec<String>, timeout: Duration) -> Self {
        let lanes = subjects.iter().map(|_| Arc::default()).collect();
        Lanes { publisher, subjects, lanes, timeout }
    }

    /// Queues `payload` (whole log lines of one request, one partition) in `partition`'s lane, in a group of
    /// at most `budget` bytes, and returns what resolves once that group is acknowledged or has failed.
    /// Must be called within a tokio runtime (it may start the lane's publishing task).
    pub fn submit(
        &self,
        partition: usize,
        payload: &[u8],
        budget: usize,
    ) -> impl Future<Output = Result<(), PublishFailed>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let lane = &self.lanes[partition];
        let start = {
            let mut state = lane.lock().expect("lane");
            match state.queue.back_mut() {
                Some(group) if group.payload.len() + payload.len() <= budget => {
                    group.payload.extend_from_slice(payload);
                    group.waiters.push(tx);
                }
                _ => state.queue.push_back(Group { payload: payload.to_vec(), waiters: vec![tx] }),
            }
            let start = state.in_flight < MAX_IN_FLIGHT;
            if start {
                state.in_flight += 1;
            }
            start
        };
        if start {
            let publisher = self.publisher.clone();
            tokio::spawn(drain(publisher, self.subjects[partition].clone(), lane.clone(), self.timeout));
        }
        // Never longer than the message ahead of this one and this one's own publish, each bounded by
        // `timeout` in the publishing task; this bound only matters should that task be gone.
        let timeout = 2 * self.timeout + Duration::from_secs(1);
        async move {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(PublishFailed { stream_not_found: false, error: "the publishing task ended".into() }),
                Err(_) => Err(PublishFailed {
                    stream_not_found: false,
                    error: format!("no acknowledgement within {timeout:?}"),
                }),
            }
        }
    }
}

/// Publishes the lane's groups, oldest first, each once its predecessor from this task is answered, until
/// the queue is empty. A publish that neither succeeds nor fails within `timeout` fails its group, so the
/// lane always moves on: a stuck publish costs its own requests a 503, never the partition's later ones.
async fn drain<P: Publisher>(publisher: P, subject: String, lane: Arc<Mutex<Lane>>, timeout: Duration) {
    loop {
        let group = {
            let mut state = lane.lock().expect("lane");
            match state.queue.pop_front() {
                Some(group) => group,
                None => {
                    state.in_flight -= 1;
                    return;
                }
            }
        };
        metrics::histogram!("eps_log_commit_batch_requests").record(group.waiters.len() as f64);
        let answer = match tokio::time::timeout(timeout, publisher.publish(subject.clone(), group.payload)).await {
            Ok(answer) => answer,
            Err(_) => Err(PublishFailed {
                stream_not_found: false,
                error: format!("JetStream did not answer within {timeout:?}"),
            }),
        };
        for waiter in group.waiters {
            // A request that stopped waiting (its client went away) has nobody to tell.
            let _ = waiter.send(answer.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Semaphore;

    /// Subject and payload of each message published.
    type Published = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

    /// Records every message; each publish waits for a permit, and fails when its payload says so.
    #[derive(Clone)]
    struct Fake {
        published: Published,
        permits: Arc<Semaphore>,
    }

    impl Publisher for Fake {
        async fn publish(&self, subject: String, payload: Vec<u8>) -> Result<(), PublishFailed> {
            if payload.windows(4).any(|w| w == b"HANG") {
                std::future::pending::<()>().await;
            }
            self.permits.acquire().await.expect("open").forget();
            let fail = payload.windows(4).any(|w| w == b"FAIL");
            self.published.lock().unwrap().push((subject, payload));
            if fail {
                Err(PublishFailed { stream_not_found: false, error: "refused".into() })
            } else {
                Ok(())
            }
        }
    }

    fn lanes(partitions: usize) -> (Lanes<Fake>, Fake) {
        let fake = Fake { published: Arc::default(), permits: Arc::new(Semaphore::new(0)) };
        let subjects = (0..partitions).map(|p| format!("s.{p}")).collect();
        (Lanes::new(fake.clone(), subjects, Duration::from_secs(10)), fake)
    }

    /// Lets every spawned task run until it waits.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn requests_arriving_while_messages_are_in_flight_share_one_message_in_arrival_order() {
        let (lanes, fake) = lanes(1);
        // The first goes out at once and waits for its acknowledgement; the next ten queue up behind it
        // as one group.
        let mut answers = Vec::new();
        for i in 0..11 {
            answers.push(tokio::spawn(lanes.submit(0, format!("line {i}\n").as_bytes(), 1 << 20)));
            if i == 0 {
                settle().await;
            }
        }
        fake.permits.add_permits(100);
        for answer in answers {
            answer.await.unwrap().expect("acknowledged");
        }
        let published = fake.published.lock().unwrap().clone();
        let payloads: Vec<String> = published.iter().map(|(_, p)| String::from_utf8(p.clone()).unwrap()).collect();
        let grouped = (1..11).map(|i| format!("line {i}\n")).collect::<String>();
        assert_eq!(payloads, ["line 0\n".to_string(), grouped], "the ten waiting are one message");
        assert!(published.iter().all(|(s, _)| s == "s.0"));
    }

    #[tokio::test]
    async fn a_group_never_exceeds_the_budget_and_lanes_are_per_partition() {
        let (lanes, fake) = lanes(2);
        let line = b"0123456789\n"; // 11 bytes
        let mut answers = Vec::new();
        for i in 0..20 {
            answers.push(tokio::spawn(lanes.submit(i % 2, line, 3 * line.len())));
        }
        settle().await;
        fake.permits.add_permits(100);
        for answer in answers {
            answer.await.unwrap().expect("acknowledged");
        }
        let published = fake.published.lock().unwrap().clone();
        let bytes: usize = published.iter().map(|(_, p)| p.len()).sum();
        assert_eq!(bytes, 20 * line.len(), "every request once");
        assert!(published.iter().all(|(_, p)| p.len() <= 3 * line.len() && p.len().is_multiple_of(line.len())));
        for subject in ["s.0", "s.1"] {
            let lines: usize = published.iter().filter(|(s, _)| s == subject).map(|(_, p)| p.len() / line.len()).sum();
            assert_eq!(lines, 10, "{subject} got its own partition's requests");
        }
    }

    #[tokio::test]
    async fn a_failed_message_fails_exactly_the_requests_in_it() {
        let (lanes, fake) = lanes(1);
        let first = tokio::spawn(lanes.submit(0, b"a\n", 1 << 20));
        settle().await;
        // The first went out on its own; these three wait as one group, which fails.
        let grouped: Vec<_> =
            [&b"c\n"[..], b"FAIL\n", b"d\n"].into_iter().map(|p| tokio::spawn(lanes.submit(0, p, 1 << 20))).collect();
        fake.permits.add_permits(1);
        first.await.unwrap().expect("first acknowledged");
        settle().await;
        // The group is out (waiting for a permit): this one is a message of its own.
        let after = tokio::spawn(lanes.submit(0, b"e\n", 1 << 20));
        settle().await;
        fake.permits.add_permits(100);
        for answer in grouped {
            let failed = answer.await.unwrap().expect_err("the whole group failed");
            assert_eq!(failed.error, "refused");
        }
        after.await.unwrap().expect("a later group is unaffected");
        let published = fake.published.lock().unwrap().clone();
        let payloads: Vec<&[u8]> = published.iter().map(|(_, p)| p.as_slice()).collect();
        assert_eq!(payloads, [&b"a\n"[..], b"c\nFAIL\nd\n", b"e\n"]);
    }

    #[tokio::test]
    async fn a_request_that_stops_waiting_stalls_nobody() {
        let (lanes, fake) = lanes(1);
        let dropped = lanes.submit(0, b"gone\n", 1 << 20);
        drop(dropped);
        let kept = tokio::spawn(lanes.submit(0, b"kept\n", 1 << 20));
        fake.permits.add_permits(100);
        kept.await.unwrap().expect("acknowledged");
        settle().await;
        let published = fake.published.lock().unwrap().clone();
        assert_eq!(published.iter().map(|(_, p)| p.len()).sum::<usize>(), "gone\nkept\n".len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_that_never_answers_fails_its_requests_after_the_timeout() {
        let (lanes, _fake) = lanes(1);
        let started = tokio::time::Instant::now();
        let failed = lanes.submit(0, b"a\n", 1 << 20).await.expect_err("no permit ever comes");
        assert!(failed.error.contains("did not answer"), "{}", failed.error);
        assert_eq!(started.elapsed(), Duration::from_secs(10), "failed at the publish timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_publish_that_never_returns_fails_its_group_and_the_lane_moves_on() {
        let (lanes, fake) = lanes(1);
        fake.permits.add_permits(100);
        let stuck = lanes.submit(0, b"HANG\n", 1 << 20);
        let stuck = tokio::spawn(stuck);
        settle().await;
        // Queued behind the stuck message: published once the lane gives up on it.
        let later = tokio::spawn(lanes.submit(0, b"later\n", 1 << 20));
        let failed = stuck.await.unwrap().expect_err("the stuck group fails");
        assert!(failed.error.contains("did not answer"), "{}", failed.error);
        later.await.unwrap().expect("the next group is published and acknowledged");
        let published = fake.published.lock().unwrap().clone();
        assert_eq!(published.iter().map(|(_, p)| p.as_slice()).collect::<Vec<_>>(), [&b"later\n"[..]]);
    }
}
