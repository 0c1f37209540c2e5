//! 1 x 1 groups inside the test process: the attention rank on the test's
//! thread, the expert on a thread of its own, the rendezvous root on a
//! third (shared by the in-process test files through `#[path]`).

use std::time::Duration;

use m2n::{Communicator, Config, Role, Root, Shape};

/// Both ranks' `Communicator::init` results, (attention, expert); `setup`
/// runs first on the expert's thread (a GPU test makes its context
/// current there).
pub fn init_pair(
    config: Config,
    setup: fn(),
) -> (m2n::Result<Communicator>, m2n::Result<Communicator>) {
    let root = Root::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let uid = root.unique_id().clone();
    let served = root.spawn(Duration::from_secs(20));
    let (uid2, config2) = (uid.clone(), config.clone());
    let expert = std::thread::spawn(move || {
        setup();
        Communicator::init(config2, Role::Expert, 0, Shape::new(1, 1), &uid2)
    });
    let attention = Communicator::init(config, Role::Attention, 0, Shape::new(1, 1), &uid);
    let expert = expert.join().expect("the expert's thread");
    if attention.is_ok() && expert.is_ok() {
        served.join().unwrap().unwrap();
    }
    (attention, expert)
}

/// A formed 1 x 1 group: (attention, expert).
pub fn pair(config: Config, setup: fn()) -> (Communicator, Communicator) {
    let (a, e) = init_pair(config, setup);
    (a.unwrap(), e.unwrap())
}
