//! SIGTERM of the real `pulse-ingest` binary: what an orchestrator sends to stop a pod. The
//! request that waits for Kafka's acknowledgement when the signal comes is answered 200 (the
//! server stops taking connections but finishes the requests it took), its event is in Kafka,
//! and the process exits 0 once the producer is flushed.

use std::process::{Command, Stdio};
use std::time::Duration;

use pulse_tests::process::{free_port, log_file, poll_until};
use pulse_tests::{brokers, create_topic, read_topic};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_answers_the_request_in_flight_and_its_event_reaches_kafka() {
    let topic = create_topic("it-sigterm", 1).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // Kafka's acknowledgement waits for linger.ms: the request is still in flight when the
    // signal comes, half a second after it was sent.
    let mut ingest = Command::new(env!("CARGO_BIN_EXE_pulse-ingest"))
        .args(["--listen", &listen, "--events-topic", &topic])
        .args([
            "--kafka-brokers",
            &brokers(),
            "--write-key",
            "key-a=partner-a",
        ])
        .args(["--kafka-opt", "linger.ms=3000"])
        .env("RUST_LOG", "info,librdkafka=warn")
        .stdout(Stdio::null())
        .stderr(log_file("ingest-sigterm"))
        .spawn()
        .expect("spawn pulse-ingest");
    poll_until(port, "/readyz", |status, _| status == 200).await;

    let post = reqwest::Client::new()
        .post(format!("http://{listen}/v1/events"))
        .basic_auth("key-a", Some(""))
        .json(&json!({"event": "page_view", "partner_id": "partner-a", "user_id": "u1", "message_id": "sigterm-1"}))
        .send();
    let post = tokio::spawn(post);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: kill only sends a signal to the child's pid, which has not been waited for.
    assert_eq!(unsafe { libc::kill(ingest.id() as i32, libc::SIGTERM) }, 0);

    let answer = post
        .await
        .unwrap()
        .expect("answered, not cut off by the stop");
    assert_eq!(answer.status(), 200, "{:?}", answer.text().await);
    let exit = ingest.wait().unwrap();
    assert_eq!(exit.code(), Some(0), "a clean stop: {exit:?}");
    let records = read_topic(&topic, 1, Duration::ZERO);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].json()["message_id"], "sigterm-1");
}
