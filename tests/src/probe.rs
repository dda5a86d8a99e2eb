//! Probing a running process from outside, as an operator's tooling would: its HTTP endpoints
//! (`/metrics`, `/healthz`, `/readyz`) and its Prometheus series. One home for the helpers the
//! tests, the benchmarks and the reliability suite all need.

use std::time::Duration;

/// `GET path` on `127.0.0.1:port`: (status, body), or `None` when nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Whether `/readyz` answers 200 within `timeout` (polled every 50 ms).
pub async fn ready_within(port: u16, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if matches!(http_get(port, "/readyz").await, Some((200, _))) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for `/readyz` to answer 200; panics after 15 s.
pub async fn wait_ready(port: u16) {
    assert!(
        ready_within(port, Duration::from_secs(15)).await,
        "the service on port {port} never became ready"
    );
}

/// The sum of every series of metric `name` (all label sets) in one `/metrics` body.
pub fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of the series of metric `name` whose labels contain every one of `labels`
/// (`key="value"` pairs as printed), in one `/metrics` body.
pub fn metric_sum_where(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// [`metric_sum_where`] of a process's live `/metrics`; `None` when it does not answer.
pub async fn scrape_sum(port: u16, name: &str, labels: &[&str]) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics").await?;
    Some(metric_sum_where(&body, name, labels))
}
