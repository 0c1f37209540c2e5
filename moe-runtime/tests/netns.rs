//! The closest stand-in here for two hosts: attention workers in one
//! network namespace, expert workers in another, joined by a veth pair,
//! m2n over tcp on their own addresses; the tokens must equal the
//! reference's. Needs root and iproute2; skips with a reason otherwise.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use moe_runtime::model::init::StoreDtype;
use support::*;

#[path = "../../tests/support/netns.rs"]
mod netns;
use netns::Net;

fn in_ns(ns: &str, args: &[String], env: &[(&str, &str)]) -> Child {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, MOE_RUN]).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a worker")
}

#[test]
fn attention_and_experts_in_two_namespaces_over_tcp_match_the_reference() {
    let net = match Net::create("moe", 9) {
        Ok(n) => n,
        Err(why) => {
            println!(
                "SKIPPED: cannot create network namespaces here ({why}); needs root and iproute2"
            );
            return;
        }
    };
    let dir = TempDir::new("netns");
    let model = checkpoint(dir.path(), "mixtral-mini", 31, 1, StoreDtype::Bf16);
    let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], (10..30).collect(), vec![77]];
    let mut common = vec!["--model".to_string(), model.display().to_string()];
    common.extend(prompt_args(&prompts));
    common.extend(
        ["--max-new-tokens", "16", "--logprobs"]
            .iter()
            .map(|s| s.to_string()),
    );
    let reference = moe_run(&[common.clone(), vec!["--reference".into()]].concat(), &[]);
    assert!(reference.status.success(), "{}", stderr(&reference));

    let mut root = in_ns(
        &net.a,
        &[
            "--serve-root".into(),
            "10.231.9.1:0".into(),
            "--timeout-s".into(),
            "60".into(),
        ],
        &[],
    );
    let mut line = String::new();
    BufReader::new(root.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uid = line
        .trim()
        .strip_prefix("M2N-UID ")
        .expect("the root prints its id")
        .to_string();
    assert!(uid.contains("10.231.9.1"), "{uid}");

    let env = [
        ("M2N_UNIQUE_ID", uid.as_str()),
        ("M2N_TRANSPORT", "tcp"),
        ("M2N_WAIT", "yield"),
    ];
    let shape = ["--attention", "2", "--experts", "2", "--microbatches", "2"].map(String::from);
    let mut workers = Vec::new();
    for (ns, role) in [(&net.a, "attention"), (&net.b, "expert")] {
        for rank in 0..2 {
            let mut args = [common.clone(), shape.to_vec()].concat();
            args.extend([
                "--worker".into(),
                role.into(),
                "--rank".into(),
                rank.to_string(),
            ]);
            workers.push((role, rank, in_ns(ns, &args, &env)));
        }
    }
    let mut lines = Vec::new();
    for (role, rank, w) in workers {
        let o = w.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "{role} {rank}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        lines.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix("MOE-OUT ").map(str::to_string)),
        );
    }
    assert!(root.wait().unwrap().success());
    // "<i> tokens: ..." lines, in prompt order, without the index.
    let mut keyed: Vec<(usize, bool, String)> = lines
        .iter()
        .map(|l| {
            let (i, rest) = l.split_once(' ').unwrap();
            (
                i.parse().unwrap(),
                rest.starts_with("logprobs"),
                rest.to_string(),
            )
        })
        .collect();
    keyed.sort();
    let got: String = keyed.into_iter().map(|(_, _, t)| t + "\n").collect();
    assert_eq!(got, stdout(&reference));
}
