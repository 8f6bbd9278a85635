#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kvgate_index::{IndexConfig, KvIndex};
use kvgate_keys::{BlockHasher, RequestContext};
use kvgate_router::{
    Candidate, LoadSnapshot, Policy, RouteError, RouteRequest, RouterConfig, Scheduler,
};
use kvgate_wire::vllm::{BlockStored, EventBatch, KvEvent};

const BS: u32 = 16;
const NAMES: [&str; 3] = ["a", "b", "c"];

fn candidates(loads: [LoadSnapshot; 3], index: &KvIndex) -> Vec<Candidate<'static>> {
    NAMES
        .iter()
        .zip(loads)
        .map(|(n, load)| Candidate {
            name: n,
            healthy: true,
            serves: true,
            block_size: BS,
            index_id: index.endpoint_id(n),
            load,
        })
        .collect()
}

fn index_with_prefix(cached: [usize; 3], tokens: &[u32]) -> KvIndex {
    let index = KvIndex::new(IndexConfig::default(), BlockHasher::from_secret(b"r"));
    for (n, blocks) in NAMES.iter().zip(cached) {
        let id = index.add_endpoint(n, "m", BS).unwrap();
        if blocks > 0 {
            let ev = KvEvent::BlockStored(BlockStored::on_gpu(
                (0..blocks as u64).collect(),
                None,
                tokens[..blocks * BS as usize].to_vec(),
                BS,
            ));
            index
                .apply_batch(
                    id,
                    &EventBatch {
                        ts: 0.0,
                        events: vec![ev],
                        data_parallel_rank: None,
                    },
                )
                .unwrap();
        }
    }
    index
}

fn keys(index: &KvIndex, tokens: &[u32]) -> Vec<(u32, Vec<u64>)> {
    let ctx = RequestContext {
        model: "m",
        ..Default::default()
    };
    vec![(
        BS,
        index
            .hasher()
            .request_keys(tokens, BS as usize, &ctx)
            .unwrap(),
    )]
}

/// A request for model "m" without a session.
fn request(prompt_tokens: usize, keys: &[(u32, Vec<u64>)]) -> RouteRequest<'_> {
    RouteRequest {
        model: "m",
        prompt_tokens,
        keys,
        session_id: None,
    }
}

fn sched(policy: Policy) -> Scheduler {
    Scheduler::new(RouterConfig {
        policy,
        ..Default::default()
    })
}

fn idle() -> LoadSnapshot {
    LoadSnapshot::default()
}

fn busy(in_flight: u64, pending: u64) -> LoadSnapshot {
    LoadSnapshot {
        in_flight,
        pending_prefill_tokens: pending,
        ..Default::default()
    }
}

#[test]
fn precise_prefers_the_longest_cached_prefix_unless_load_outweighs_it() {
    let tokens: Vec<u32> = (0..1024).collect();
    let index = index_with_prefix([16, 48, 0], &tokens);
    let k = keys(&index, &tokens);
    let req = request(1024, &k);
    let s = sched(Policy::PrecisePrefix);
    let d = s
        .schedule(
            &req,
            &candidates([idle(), idle(), idle()], &index),
            Some(&index),
        )
        .unwrap();
    assert_eq!(NAMES[d.chosen], "b");
    assert_eq!(d.reason, "prefix");
    assert_eq!(d.expected_cached_tokens, 768);
    assert!(d.explain().contains("b:256/768p"), "{}", d.explain());
    // b has 512 more cached tokens than a (counted twice: a copy splits the
    // group); 3000 queued prefill tokens on b outweigh that.
    let d = s
        .schedule(
            &req,
            &candidates([idle(), busy(1, 3000), idle()], &index),
            Some(&index),
        )
        .unwrap();
    assert_eq!(NAMES[d.chosen], "a");
    assert_eq!(d.reason, "load_over_prefix");
}

/// Moving a prompt off the endpoint that caches it costs the recomputed
/// tokens once more, and again per request waiting where it goes: spilling
/// to an idle endpoint is cheap, spilling to a busy one deepens its queue.
#[test]
fn a_prefix_moves_to_an_idle_endpoint_but_not_to_a_busy_one() {
    let tokens: Vec<u32> = (0..1024).collect();
    let index = index_with_prefix([16, 48, 0], &tokens);
    let k = keys(&index, &tokens);
    let req = request(1024, &k);
    let s = sched(Policy::PrecisePrefix);
    let waiting = |in_flight, pending, pending_requests| LoadSnapshot {
        pending_requests,
        ..busy(in_flight, pending)
    };
    // b caches 512 tokens more than a but has 3000 queued; a is idle: 768
    // to compute on a, + 512 for the copy, vs 256 + 1500 + 64 on b.
    let d = s
        .schedule(
            &req,
            &candidates([idle(), waiting(1, 3000, 1), idle()], &index),
            Some(&index),
        )
        .unwrap();
    assert_eq!(NAMES[d.chosen], "a");
    // a and c have one request waiting too: what they would recompute
    // counts four times more (a: 768 + 100 + 64 + 512 * (1 + 4) > 1820), so
    // b keeps it.
    let all_waiting = candidates(
        [waiting(1, 200, 1), waiting(1, 3000, 1), waiting(1, 200, 1)],
        &index,
    );
    let d = s.schedule(&req, &all_waiting, Some(&index)).unwrap();
    assert_eq!(NAMES[d.chosen], "b", "{}", d.explain());
    assert_eq!(d.reason, "prefix");
    assert!(d.explain().contains("a:3492/256p"), "{}", d.explain());
    // Without the terms (the router before them), a would have won.
    let mut before = RouterConfig::default();
    before.weights.lost_prefix_per_waiting_request = 0.0;
    before.weights.lost_prefix_token = 0.0;
    let d = Scheduler::new(before)
        .schedule(&req, &all_waiting, Some(&index))
        .unwrap();
    assert_eq!(NAMES[d.chosen], "a");
}

#[test]
fn approximate_prefix_learns_from_routing_decisions() {
    let tokens: Vec<u32> = (0..512).collect();
    let index = index_with_prefix([0, 0, 0], &tokens);
    let k = keys(&index, &tokens);
    let s = sched(Policy::ApproxPrefix);
    let req = request(512, &k);
    let c = candidates([idle(), idle(), idle()], &index);
    let first = s.schedule(&req, &c, None).unwrap();
    assert_eq!(first.reason, "load_no_prefix");
    s.observe_routed(NAMES[first.chosen], "m", BS, &k[0].1);
    for _ in 0..5 {
        let d = s.schedule(&req, &c, None).unwrap();
        assert_eq!(d.chosen, first.chosen);
        assert_eq!(d.reason, "prefix");
    }
    s.forget_endpoint(NAMES[first.chosen]);
    assert_eq!(s.schedule(&req, &c, None).unwrap().reason, "load_no_prefix");
}

#[test]
fn baselines_behave_as_named() {
    let tokens: Vec<u32> = (0..64).collect();
    let index = index_with_prefix([4, 0, 0], &tokens);
    let k = keys(&index, &tokens);
    let req = request(64, &k);
    let c = candidates([busy(5, 0), busy(1, 0), busy(3, 0)], &index);
    let rr = sched(Policy::RoundRobin);
    let picks: Vec<usize> = (0..6)
        .map(|_| rr.schedule(&req, &c, Some(&index)).unwrap().chosen)
        .collect();
    assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    let ll = sched(Policy::LeastLoad);
    assert_eq!(ll.schedule(&req, &c, None).unwrap().chosen, 1);
    let random = sched(Policy::Random);
    let mut seen = [false; 3];
    for _ in 0..200 {
        seen[random.schedule(&req, &c, None).unwrap().chosen] = true;
    }
    assert_eq!(seen, [true; 3]);
    // Sessions stick, and move only when their endpoint leaves.
    let ss = sched(Policy::Session);
    let with_session = RouteRequest {
        session_id: Some("user-42"),
        ..req
    };
    let home = ss.schedule(&with_session, &c, None).unwrap().chosen;
    for _ in 0..10 {
        assert_eq!(ss.schedule(&with_session, &c, None).unwrap().chosen, home);
    }
    let mut c2 = c.clone();
    c2[home].healthy = false;
    let moved = ss.schedule(&with_session, &c2, None).unwrap().chosen;
    assert_ne!(moved, home);
    let other = (0..3).find(|i| *i != home && *i != moved).unwrap();
    c2[other].healthy = false;
    c2[home].healthy = true;
    assert_eq!(ss.schedule(&with_session, &c2, None).unwrap().chosen, home);
}

#[test]
fn equal_costs_spread_distinct_prefixes_and_gather_a_repeated_one() {
    let tokens: Vec<u32> = (0..64).collect();
    let index = index_with_prefix([0, 0, 0], &tokens);
    let s = sched(Policy::PrecisePrefix);
    let c = candidates([idle(), idle(), idle()], &index);
    // Distinct cold prefixes on an idle fleet go where routed prefixes take
    // the least room: evenly, as their groups' later requests will follow.
    let mut counts = [0; 3];
    let mut held = Vec::new();
    for p in 0..60u32 {
        let t: Vec<u32> = (0..64).map(|i| p * 1000 + i).collect();
        let k = keys(&index, &t);
        let req = request(64, &k);
        let chosen = s.schedule(&req, &c, Some(&index)).unwrap().chosen;
        counts[chosen] += 1;
        held.push(s.observe_routed(NAMES[chosen], "m", BS, &k[0].1));
    }
    assert_eq!(counts, [20, 20, 20]);
    // One prefix sent repeatedly stays where its first request is computing it.
    let k = keys(&index, &tokens);
    let req = request(64, &k);
    let first = s.schedule(&req, &c, Some(&index)).unwrap().chosen;
    held.push(s.observe_routed(NAMES[first], "m", BS, &k[0].1));
    for _ in 0..10 {
        let d = s.schedule(&req, &c, Some(&index)).unwrap();
        assert_eq!(d.chosen, first, "{}", d.explain());
        assert_eq!(d.reason, "prefix");
    }
}

#[test]
fn filters_give_typed_errors() {
    let tokens: Vec<u32> = (0..64).collect();
    let index = index_with_prefix([0, 0, 0], &tokens);
    let k = keys(&index, &tokens);
    let req = request(64, &k);
    let s = sched(Policy::PrecisePrefix);
    let mut c = candidates([idle(), idle(), idle()], &index);
    for x in &mut c {
        x.healthy = false;
    }
    assert_eq!(
        s.schedule(&req, &c, Some(&index)),
        Err(RouteError::NoHealthyEndpoint("m".into()))
    );
    for x in &mut c {
        x.serves = false;
    }
    assert_eq!(
        s.schedule(&req, &c, Some(&index)),
        Err(RouteError::UnknownModel("m".into()))
    );
    c[2].serves = true;
    c[2].healthy = true;
    assert_eq!(s.schedule(&req, &c, Some(&index)).unwrap().chosen, 2);
}

#[test]
fn a_prefix_being_computed_is_joined_not_copied() {
    // A group's first request (1024 shared + 512 own tokens) went to b moments
    // ago and is still prefilling there (no KV events yet).
    let tokens: Vec<u32> = (0..1024).collect();
    let index = index_with_prefix([0, 0, 0], &tokens);
    let k = keys(&index, &tokens);
    let s = sched(Policy::PrecisePrefix);
    s.observe_routed("b", "m", BS, &k[0].1);
    let mut second: Vec<u32> = tokens.clone();
    second.extend(5000..5100);
    let k2 = keys(&index, &second);
    let req = request(second.len(), &k2);
    let d = s
        .schedule(
            &req,
            &candidates([idle(), busy(1, 1536), idle()], &index),
            Some(&index),
        )
        .unwrap();
    // b's pending prefill is this prompt's own prefix: the second request
    // joins it instead of recomputing 1024 tokens on an idle endpoint.
    assert_eq!(NAMES[d.chosen], "b", "{}", d.explain());
    assert_eq!(d.expected_cached_tokens, 1024);
    // Unrelated queued work on b still counts against it.
    let d = s
        .schedule(
            &req,
            &candidates([idle(), busy(2, 1536 + 4000), idle()], &index),
            Some(&index),
        )
        .unwrap();
    assert_ne!(NAMES[d.chosen], "b", "{}", d.explain());
}

#[test]
fn a_cold_prompt_waits_behind_the_oldest_queue_not_its_home() {
    // Every endpoint has one long prompt queued (same pending tokens, so the
    // costs tie); b got its request longest ago, so b's is the nearest to
    // done. Round robin gets this by construction; a home picked by hash
    // would put a third of these behind a prefill that has only just begun.
    let index = index_with_prefix([0, 0, 0], &[]);
    let s = sched(Policy::PrecisePrefix);
    let queued = |in_flight, last_routed| LoadSnapshot {
        last_routed,
        ..busy(in_flight, 7200)
    };
    // a also decodes one more request: within the slack, still a tie.
    let c = candidates([queued(2, 30), queued(1, 10), queued(1, 20)], &index);
    for p in 0..30u32 {
        let t: Vec<u32> = (0..7200).map(|i| p * 10_000 + i).collect();
        let k = keys(&index, &t);
        let req = request(t.len(), &k);
        let d = s.schedule(&req, &c, Some(&index)).unwrap();
        assert_eq!(NAMES[d.chosen], "b", "prompt {p}: {}", d.explain());
    }
    // An endpoint with nothing queued still wins outright.
    let c = candidates([queued(2, 30), queued(1, 10), busy(3, 0)], &index);
    let t: Vec<u32> = (0..7200).collect();
    let k = keys(&index, &t);
    let req = request(t.len(), &k);
    assert_eq!(
        NAMES[s.schedule(&req, &c, Some(&index)).unwrap().chosen],
        "c"
    );
}

/// The scheduler's belief that a request is computing its prefix lasts
/// while the request waits for its first token, however long, then a grace
/// for its KV events; a prefix still expected by another request stays.
#[test]
fn speculation_lasts_until_the_first_token_and_its_grace() {
    let tokens: Vec<u32> = (0..1024).collect();
    let index = index_with_prefix([0, 0, 0], &tokens);
    let k = keys(&index, &tokens);
    let clock = kvgate_index::Clock::manual();
    let s = Scheduler::with_clock(RouterConfig::default(), clock.clone());
    let req = request(1024, &k);
    let c = candidates([idle(), busy(1, 1024), idle()], &index);
    let on_b = |s: &Scheduler| {
        let d = s.schedule(&req, &c, Some(&index)).unwrap();
        d.scores[1].cached_source == "speculative"
    };
    let first = s.observe_routed("b", "m", BS, &k[0].1);
    let second = s.observe_routed("b", "m", BS, &k[0].1);
    assert!(first.is_some() && on_b(&s));
    // Queued for a minute: still expected (a TTL from routing would have lapsed).
    clock.set_secs(60);
    s.expire();
    assert!(on_b(&s));
    // The first one's first token: the second still expects the prefix.
    drop(first);
    clock.set_secs(62);
    s.expire();
    assert!(on_b(&s));
    // Both started; after the grace only KV events count.
    drop(second);
    clock.set_secs(62 + kvgate_router::DEFAULT_SPECULATIVE_TTL_SECS - 1);
    s.expire();
    assert!(on_b(&s), "within the grace");
    clock.set_secs(62 + kvgate_router::DEFAULT_SPECULATIVE_TTL_SECS);
    s.expire();
    assert!(!on_b(&s), "forgotten after the grace");
    // Baselines do not speculate.
    let rr = Scheduler::with_clock(
        RouterConfig {
            policy: Policy::RoundRobin,
            ..RouterConfig::default()
        },
        clock,
    );
    assert!(rr.observe_routed("b", "m", BS, &k[0].1).is_none());
}

/// A reloaded config's policy and weights decide the requests that follow;
/// a change to what was sized at start is refused and changes nothing.
#[test]
fn a_reload_swaps_policy_and_weights_and_refuses_restart_only_settings() {
    let tokens: Vec<u32> = (0..1024).collect();
    let index = index_with_prefix([16, 48, 0], &tokens);
    let k = keys(&index, &tokens);
    let req = request(1024, &k);
    let s = sched(Policy::PrecisePrefix);
    let all_idle = || candidates([idle(), idle(), idle()], &index);
    assert_eq!(
        s.schedule(&req, &all_idle(), Some(&index)).unwrap().reason,
        "prefix"
    );

    let refused = s.set_routing(RouterConfig {
        policy: Policy::RoundRobin,
        approx_ttl_secs: 7,
        speculative_ttl_secs: 9,
        ..Default::default()
    });
    assert_eq!(
        refused,
        Err(kvgate_router::RestartOnly(vec![
            "approx_ttl_secs",
            "speculative_ttl_secs"
        ]))
    );
    assert_eq!(s.config().policy, Policy::PrecisePrefix);
    assert_eq!(
        s.schedule(&req, &all_idle(), Some(&index)).unwrap().reason,
        "prefix"
    );

    // Weights: a queued prefill token now outweighs b's cached prefix at once.
    let mut heavy = RouterConfig::default();
    heavy.weights.queued_prefill_token = 10.0;
    s.set_routing(heavy).unwrap();
    let d = s
        .schedule(
            &req,
            &candidates([idle(), busy(1, 300), idle()], &index),
            Some(&index),
        )
        .unwrap();
    assert_eq!((NAMES[d.chosen], d.reason), ("a", "load_over_prefix"));

    s.set_routing(RouterConfig {
        policy: Policy::RoundRobin,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.config().policy, Policy::RoundRobin);
    let d = s.schedule(&req, &all_idle(), Some(&index)).unwrap();
    assert_eq!(d.reason, "round_robin");
}
