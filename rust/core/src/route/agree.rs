//! Sizes that replicas agree on.
//!
//! Every read of an object is planned on its size: a replica that reports a
//! wrong one (a HEAD whose `Content-Length` is not the object's) makes those
//! reads short, padded or failed on every path, and the fault is that
//! replica's, not the object's. So where there are two or more network
//! replicas, a size (or metadata) answer is confirmed by a second replica,
//! asked at the same time: one more request, no added wait. When the two
//! disagree the claims are settled on evidence: each claimant's own bytes (a
//! ranged GET names the object's total size) and every other replica's size.
//! The majority wins; a replica whose claim lost, or whose metadata its own
//! bytes contradict, is counted (`size_disagreements`) and ejected. Without
//! a majority the call fails naming each claim: never short or padded data.
//!
//! Local replicas are not asked twice: a `stat` is the file's own size.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{bit, Router, Target, Tried};
use crate::error::{Error, ReplicaFailure, Result};

/// How long the evidence of a disagreement (each claimant's ranged GET, the
/// other replicas' sizes) is waited for, unless `timeout_ms` says otherwise.
const EVIDENCE_TIMEOUT: Duration = Duration::from_secs(2);

impl Router {
    /// Routes a `Size` or `Info` target like a read and, where a second
    /// network replica is healthy, has that replica confirm the size.
    pub(super) async fn route_agreed(&self, key: &str, target: &mut Target<'_>) -> Result<()> {
        let Some((first_choice, second_choice)) = self.opinion_pair(key) else {
            return self.route(key, target).await;
        };
        let mut other = target.second_opinion();
        let start = Instant::now();
        let (first, second) = {
            let first = self.route_from(key, target, 0);
            let second = self.route_from(key, &mut other, bit(first_choice));
            tokio::pin!(first);
            tokio::pin!(second);
            tokio::select! {
                biased;
                first = &mut first => {
                    // The second opinion may take as long again as the
                    // first did (both are one round trip), at least the
                    // hedge delay its replica's reads get: a silent replica
                    // costs that, no more. Without hedging, reads wait for
                    // a slow replica, and so does its opinion.
                    let grace = match self.hedge_delay(second_choice) {
                        Some(delay) => start.elapsed().max(delay),
                        None => self.config.deadline.saturating_sub(start.elapsed()),
                    };
                    let second = tokio::time::timeout(grace, &mut second).await.ok();
                    (first, second)
                }
                second = &mut second => (first.await, Some(second)),
            }
        };
        let answered = first?;
        let Some(second) = second else {
            // No answer in time: like a primary that lost a hedge race (an
            // ejected replica asked as its probe goes out again, for longer).
            let probe = self.replicas[second_choice].health.is_ejected();
            self.primary_lost_hedge(second_choice, probe);
            return Ok(());
        };
        let (Some(r1), Ok(Some(r2))) = (answered, second) else {
            return Ok(());
        };
        let (s1, s2) = (target.size(), other.size());
        if r1 == r2 || s1 == s2 {
            return Ok(());
        }
        let agreed = self.settle_size(key, [(r1, s1), (r2, s2)]).await?;
        if agreed == s2 {
            target.take_answer(&mut other);
        } else if agreed != s1 {
            target.set_size(agreed);
        }
        Ok(())
    }

    /// The first two replicas of `key`'s preference list that may be asked
    /// (healthy, or ejected and due for a probe: a probe's size is checked
    /// too), if the first waits on the network (see the module docs).
    fn opinion_pair(&self, key: &str) -> Option<(usize, usize)> {
        let prefs = self.preference_list(key);
        let now = Instant::now();
        let mut healthy = prefs.iter().filter(|&r| {
            let health = &self.replicas[r].health;
            !health.is_ejected() || health.availability(now) != super::Availability::Ejected
        });
        let first = healthy.next()?;
        let second = healthy.next()?;
        self.replicas[first].remote.then_some((first, second))
    }

    /// A read of `target` with the replicas in `tried` left out; the replica
    /// that answered.
    async fn route_from(
        &self,
        key: &str,
        target: &mut Target<'_>,
        tried: Tried,
    ) -> Result<Option<usize>> {
        let mut read = self.read(key, target, false, None);
        read.tried = tried;
        match self.run(&mut read).await {
            Some(Ok(())) => Ok(read.answered),
            Some(Err(e)) => Err(e),
            None => Err(Error::Remote(format!("no replica answered for {key:?}"))),
        }
    }

    /// The size of `key` that the evidence supports, given two replicas'
    /// differing `claims`; each replica it proves wrong is counted and
    /// ejected.
    async fn settle_size(&self, key: &str, claims: [(usize, u64); 2]) -> Result<u64> {
        let bound = self
            .config
            .timeout
            .unwrap_or(EVIDENCE_TIMEOUT)
            .min(self.config.deadline);
        let ask = |r: usize, own_bytes: bool| async move {
            // Counted in the replica's requests like any attempt.
            self.replicas[r].health.counters.requests.add(1);
            let store = self.replicas[r].store.as_ref();
            let answer = match own_bytes {
                true => store.read_size(key),
                false => store.size(key),
            };
            (
                r,
                tokio::time::timeout(bound, answer)
                    .await
                    .ok()
                    .and_then(|a| a.ok()),
            )
        };
        let others = (0..self.replicas.len()).filter(|&i| {
            claims.iter().all(|&(r, _)| r != i) && !self.replicas[i].health.is_ejected()
        });
        let (own, other_sizes) = futures::join!(
            futures::future::join_all(claims.iter().map(|&(r, _)| ask(r, true))),
            futures::future::join_all(others.map(|i| ask(i, false))),
        );
        // Each replica votes once: a claimant by its bytes where they
        // answered (a claim they contradict is already its fault).
        let mut votes: Vec<(usize, u64)> = Vec::new();
        let mut at_fault: Tried = 0;
        for (&(r, claimed), (_, bytes)) in claims.iter().zip(&own) {
            match bytes {
                Some(total) if *total != claimed => {
                    at_fault |= bit(r);
                    votes.push((r, *total));
                }
                _ => votes.push((r, claimed)),
            }
        }
        votes.extend(other_sizes.into_iter().filter_map(|(i, s)| Some((i, s?))));
        let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
        for &(_, size) in &votes {
            *counts.entry(size).or_default() += 1;
        }
        let most = counts.values().copied().max().unwrap_or(0);
        let mut leaders = counts.iter().filter(|&(_, &n)| n == most);
        let (Some((&agreed, _)), None) = (leaders.next(), leaders.next()) else {
            return Err(self.no_agreed_size(key, &claims, &votes));
        };
        for &(r, claimed) in &claims {
            if claimed != agreed {
                at_fault |= bit(r);
            }
        }
        for &(r, size) in &votes {
            if size != agreed {
                at_fault |= bit(r);
            }
        }
        for r in (0..self.replicas.len()).filter(|&r| at_fault & bit(r) != 0) {
            self.size_disagreement(r);
        }
        Ok(agreed)
    }

    /// A replica proven wrong about a size: counted, and out of rotation
    /// (never the last healthy one) so the next sizes come from the others.
    fn size_disagreement(&self, r: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let health = &self.replicas[r].health;
        health.counters.size_disagreements.fetch_add(1, Relaxed);
        health.on_failure();
        self.maybe_eject(r, Instant::now());
    }

    fn no_agreed_size(&self, key: &str, claims: &[(usize, u64)], votes: &[(usize, u64)]) -> Error {
        let says = |r: usize| {
            let claimed = claims.iter().find(|c| c.0 == r).map(|c| c.1);
            let voted = votes.iter().find(|v| v.0 == r).map(|v| v.1);
            match (claimed, voted) {
                (Some(c), Some(v)) if c != v => {
                    format!("says {c} bytes, its own bytes say {v}: replicas disagree on the size")
                }
                (_, Some(v)) | (Some(v), None) => {
                    format!("says {v} bytes: replicas disagree on the size")
                }
                (None, None) => "did not answer: replicas disagree on the size".to_owned(),
            }
        };
        Error::ReplicasUnavailable {
            path: key.to_owned(),
            failures: self
                .replicas
                .iter()
                .enumerate()
                .map(|(r, replica)| ReplicaFailure {
                    replica: replica.health.name.clone(),
                    error: says(r),
                })
                .collect(),
        }
    }
}
