//! Per-connection ordering: reads of one connection run concurrently, a write waits
//! for every request read before it, and requests read after a write wait for it.
//! So a pipelining client reads its own writes, while a burst of reads never waits.

use std::cell::RefCell;
use std::collections::VecDeque;

use tokio::sync::Notify;

/// Orders a connection's requests around its writes: reads run concurrently with each
/// other; a write starts once every earlier request has finished, and requests after
/// a write start once it has finished. With no writes in flight nothing waits.
#[derive(Default)]
pub struct Sequencer {
    state: RefCell<SequencerState>,
    changed: Notify,
}

#[derive(Default)]
struct SequencerState {
    /// Writes started so far (the epoch of the next request).
    writes_started: u64,
    /// Writes finished so far.
    writes_done: u64,
    /// Unfinished reads per epoch, from epoch `first_epoch` on; a write of epoch e
    /// waits for the reads of epoch e.
    reads_running: VecDeque<usize>,
    first_epoch: u64,
    /// Requests waiting in `admit`; nobody is notified when there are none.
    waiting: usize,
}

impl SequencerState {
    fn reads_of(&mut self, epoch: u64) -> &mut usize {
        while self.first_epoch + (self.reads_running.len() as u64) <= epoch {
            self.reads_running.push_back(0);
        }
        &mut self.reads_running[(epoch - self.first_epoch) as usize]
    }
}

/// A request's place in its connection's order, taken when its line is read.
pub struct Ticket {
    epoch: u64,
    write: bool,
}

impl Sequencer {
    /// Takes the next place in the connection's order, as its line is read.
    pub fn ticket(&self, write: bool) -> Ticket {
        let mut s = self.state.borrow_mut();
        let epoch = s.writes_started;
        if write {
            s.writes_started += 1;
        } else {
            *s.reads_of(epoch) += 1;
        }
        Ticket { epoch, write }
    }

    /// Whether the request holding `t` may start now.
    pub fn may_start(&self, t: &Ticket) -> bool {
        let mut s = self.state.borrow_mut();
        // Everything of epoch e waits for the writes before it; a write also waits
        // for the reads of its epoch (those read before it on this connection).
        s.writes_done >= t.epoch && (!t.write || *s.reads_of(t.epoch) == 0)
    }

    /// Waits until the request holding `t` may start.
    pub async fn admit(&self, t: &Ticket) {
        if self.may_start(t) {
            return;
        }
        self.state.borrow_mut().waiting += 1;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.may_start(t) {
                break;
            }
            notified.await;
        }
        self.state.borrow_mut().waiting -= 1;
    }

    /// The request holding `t` has finished.
    pub fn finish(&self, t: Ticket) {
        let mut s = self.state.borrow_mut();
        if t.write {
            s.writes_done += 1;
        } else {
            *s.reads_of(t.epoch) -= 1;
        }
        // Drop the counts of finished epochs that no one can wait for any more.
        while s.first_epoch < s.writes_done && s.reads_running.front() == Some(&0) {
            s.reads_running.pop_front();
            s.first_epoch += 1;
        }
        let notify = s.waiting > 0;
        drop(s);
        if notify {
            self.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The rule the sequencer implements, stated plainly: a request may start when
    /// every write before it has finished, and a write also waits for every request
    /// before it.
    fn model_may_start(writes: &[bool], done: &[bool], i: usize) -> bool {
        (0..i).all(|j| done[j] || (!writes[j] && !writes[i]))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        /// Against the model, for any mix of reads and writes and any order in which
        /// running requests finish.
        #[test]
        fn matches_the_model(
            writes in prop::collection::vec(any::<bool>(), 1..40),
            picks in prop::collection::vec(any::<prop::sample::Index>(), 0..200),
        ) {
            let seq = Sequencer::default();
            let mut tickets: Vec<Option<Ticket>> =
                writes.iter().map(|w| Some(seq.ticket(*w))).collect();
            let n = writes.len();
            let (mut started, mut done) = (vec![false; n], vec![false; n]);
            let mut picks = picks.into_iter();
            while done.iter().any(|d| !d) {
                for i in 0..n {
                    if started[i] {
                        continue;
                    }
                    let t = tickets[i].as_ref().unwrap();
                    prop_assert_eq!(seq.may_start(t), model_may_start(&writes, &done, i), "request {}", i);
                    if seq.may_start(t) {
                        started[i] = true;
                    }
                }
                let running: Vec<usize> = (0..n).filter(|i| started[*i] && !done[*i]).collect();
                prop_assert!(!running.is_empty(), "nothing can run: the order is stuck");
                let i = match picks.next() {
                    Some(p) => running[p.index(running.len())],
                    None => running[0],
                };
                seq.finish(tickets[i].take().unwrap());
                done[i] = true;
            }
        }
    }

    #[test]
    fn reads_never_wait_for_reads() {
        let seq = Sequencer::default();
        let t: Vec<Ticket> = (0..5).map(|_| seq.ticket(false)).collect();
        assert!(t.iter().all(|t| seq.may_start(t)));
    }

    #[test]
    fn a_write_waits_for_earlier_reads_and_later_requests_wait_for_it() {
        let seq = Sequencer::default();
        let r = seq.ticket(false);
        let w = seq.ticket(true);
        let after = seq.ticket(false);
        assert!(!seq.may_start(&w));
        assert!(!seq.may_start(&after));
        seq.finish(r);
        assert!(seq.may_start(&w));
        assert!(!seq.may_start(&after));
        seq.finish(w);
        assert!(seq.may_start(&after));
    }

    #[tokio::test]
    async fn admit_wakes_when_the_write_finishes() {
        let seq = std::rc::Rc::new(Sequencer::default());
        let w = seq.ticket(true);
        let after = seq.ticket(false);
        let local = tokio::task::LocalSet::new();
        let waiter = {
            let seq = seq.clone();
            local.spawn_local(async move {
                seq.admit(&after).await;
                seq.finish(after);
            })
        };
        local
            .run_until(async {
                tokio::task::yield_now().await;
                assert!(!waiter.is_finished());
                seq.finish(w);
                waiter.await.unwrap();
            })
            .await;
    }
}
