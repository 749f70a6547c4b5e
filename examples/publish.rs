//! Publishes one event with async-nats: `NATS_URL=nats://127.0.0.1:4222
//! cargo run --example publish`. README's "Publishing" shows this file.

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let client = async_nats::connect(std::env::var("NATS_URL")?).await?;
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Sse-Event", "order.shipped");
    let payload = r#"{"status":"shipped"}"#.into();
    // The second await returns once JetStream stored it; `sequence` is the event's SSE id.
    let ack = js
        .publish_with_headers("events.orders.42", headers, payload)
        .await?
        .await?;
    println!("{}", ack.sequence);
    Ok(())
}
