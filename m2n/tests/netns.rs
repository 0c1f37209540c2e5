//! m2n over a real network stack: two network namespaces joined by a veth
//! pair, attention ranks in one, experts in the other, talking tcp over
//! their own addresses. Needs root and iproute2; skips with a reason
//! otherwise.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use m2n::{Role, UniqueId};
use support::*;

#[path = "../../tests/support/netns.rs"]
mod netns;
use netns::Net;

#[test]
fn attention_and_experts_in_separate_namespaces_over_veth() {
    let net = match Net::create("m2n", 7) {
        Ok(n) => n,
        Err(why) => {
            println!(
                "SKIPPED: cannot create network namespaces here ({why}); needs root and iproute2"
            );
            return;
        }
    };
    let in_a = ["ip", "netns", "exec", net.a.as_str()];
    let in_b = ["ip", "netns", "exec", net.b.as_str()];
    // The bootstrap root lives in namespace a, on its veth address.
    let root = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.a,
            DEMO,
            "--serve-root",
            "10.231.7.1:0",
            "--timeout-s",
            "60",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start root");
    let mut root = Worker::watch(Role::Attention, usize::MAX, root);
    let line = root
        .wait_line("M2N-UID ", Duration::from_secs(10))
        .expect("root printed its unique id");
    let uid: UniqueId = line["M2N-UID ".len()..].parse().unwrap();
    assert_eq!(uid.root.ip().to_string(), "10.231.7.1");

    let (m, n, rounds, bytes) = (2, 2, 300u64, 65536usize);
    let flags = ["--rounds", "300", "--bytes", "65536", "--timeout-s", "60"];
    let env = [("M2N_TRANSPORT", "tcp")];
    let before = net.rx_bytes_b();
    let mut workers = Vec::new();
    for rank in 0..m {
        workers.push(spawn_worker_in(
            &in_a,
            &uid,
            Role::Attention,
            rank,
            m,
            n,
            &flags,
            &env,
        ));
    }
    for rank in 0..n {
        workers.push(spawn_worker_in(
            &in_b,
            &uid,
            Role::Expert,
            rank,
            m,
            n,
            &flags,
            &env,
        ));
    }
    for w in workers.iter_mut() {
        let status = w.wait_exit(Duration::from_secs(120)).expect("worker hung");
        let result = w
            .seen
            .iter()
            .find(|l| l.starts_with("M2N-RESULT"))
            .cloned()
            .unwrap_or_default();
        assert!(status.success(), "{} {}: {:?}", w.role, w.rank, w.seen);
        assert!(
            result.contains("transport=tcp") && result.contains("wrong=0"),
            "{result}"
        );
    }
    assert!(root
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    // The dispatch payload really crossed the veth into namespace b.
    let crossed = net.rx_bytes_b() - before;
    let payload = m as u64 * n as u64 * rounds * bytes as u64;
    assert!(
        crossed >= payload,
        "only {crossed} bytes reached namespace b; dispatch alone is {payload}"
    );
}
