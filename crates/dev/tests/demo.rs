//! The demo as a user runs it (`flowcoach-dev demo`, which builds and starts the real
//! daemon): the whole path from the simulator through flowcoach to the demo app and back,
//! then a rotation, a drop and a clean stop. The demo fails on any step that does not
//! happen within its bounds.

use std::process::Command;

#[test]
fn the_demo_shows_a_bot_answering_behind_flowcoach() {
    let output = Command::new(env!("CARGO_BIN_EXE_flowcoach-dev"))
        .args(["demo", "--duration", "3s"])
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("which replied with chat.postMessage"),
        "{stdout}"
    );
    assert!(
        stdout.contains("in the ack: Hello <@U0SIM>! (answered in the ack by the demo app"),
        "{stdout}"
    );
    assert!(
        stdout.contains("last socket closed with a clean close handshake: true"),
        "{stdout}"
    );
}
