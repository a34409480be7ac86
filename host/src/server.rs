//! Assembles the host: log, store, runtime, plugins, outbox forwarder and HTTP front, and
//! shuts them down in order.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::config::{Config, LogBackend};
use crate::envelope::Routing;
use crate::fanout::{FANOUT_TOPIC, Hub};
use crate::http::{AppState, router};
use crate::log::EventLog;
use crate::log::embedded::EmbeddedLog;
use crate::log::iggy::{IggyLog, IggySettings};
use crate::plugins::runner::DEAD_LETTER_TOPIC;
use crate::plugins::{Plugins, RunnerDeps};
use crate::runtime::Runtime;
use crate::store::Store;

/// Run the host until `shutdown` resolves.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    config.validate()?;
    let routing = Arc::new(Routing::default());
    let (log, backend): (Arc<dyn EventLog>, &'static str) = match config.log {
        LogBackend::Embedded => (
            Arc::new(
                EmbeddedLog::open(&config.data_dir.join("log"), config.partitions)
                    .with_context(|| format!("opening the log in {}", config.data_dir.display()))?,
            ),
            "embedded",
        ),
        LogBackend::Iggy => {
            tracing::info!(
                address = %config.iggy.address,
                stream = %config.iggy.stream,
                "using Iggy. Zero loss across an Iggy crash needs the server to save every batch: \
                 IGGY_SYSTEM_PARTITION_MESSAGES_REQUIRED_TO_SAVE=1 and IGGY_SYSTEM_PARTITION_ENFORCE_FSYNC=true \
                 (Owlery cannot read the server's settings to check)"
            );
            // The shared fan-out log keeps one order: one partition.
            let iggy = IggySettings { single_partition_topics: vec![FANOUT_TOPIC.to_owned()], ..config.iggy.clone() };
            let log = IggyLog::open(&config.data_dir.join("iggy"), iggy)
                .with_context(|| format!("opening the Iggy spool in {}", config.data_dir.display()))?;
            (Arc::new(log), "iggy")
        }
    };
    let mut topics = routing.topics();
    topics.push(DEAD_LETTER_TOPIC.to_owned());
    let shared_fanout = log.is_shared();
    if shared_fanout {
        topics.push(FANOUT_TOPIC.to_owned());
    }
    log.ensure_topics(&topics).await.context("creating topics")?;
    let mut store =
        Store::open(&config.data_dir, config.fanout_retention, Duration::from_secs(config.fanout_max_age_secs))
            .context("opening the store")?;
    if shared_fanout {
        store.share_fanout(FANOUT_TOPIC);
    }
    let store = Arc::new(store);
    let runtime = Arc::new(Runtime::new(&config.data_dir.join("cache")).context("starting the wasm runtime")?);
    let hub = Hub::new(store.clone(), crate::fanout::ClientLimits { queue: config.client_queue }, shared_fanout);
    let mirror = shared_fanout.then(|| tokio::spawn(crate::fanout::mirror(log.clone(), store.clone(), hub.clone())));
    let outbox = Arc::new(Notify::new());
    let deps = Arc::new(RunnerDeps {
        runtime,
        log: log.clone(),
        store: store.clone(),
        routing: routing.clone(),
        hub: hub.clone(),
        outbox: outbox.clone(),
        tokio: tokio::runtime::Handle::current(),
    });
    std::fs::create_dir_all(&config.plugins_dir)
        .with_context(|| format!("creating the plugins directory {}", config.plugins_dir.display()))?;
    let plugins = Arc::new(Plugins::new(deps, config.plugins_dir.clone()));
    // Watch first, so that nothing written while the directory is read is missed.
    let watcher = crate::plugins::watcher::watch(plugins.clone())
        .with_context(|| format!("watching {}", config.plugins_dir.display()))?;
    {
        let plugins = plugins.clone();
        tokio::task::spawn_blocking(move || plugins.load_dir())
            .await?
            .with_context(|| format!("reading {}", config.plugins_dir.display()))?;
    }
    let forwarder = tokio::spawn(forward_outbox(store.clone(), log.clone(), outbox.clone()));

    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let address = listener.local_addr()?;
    let send_buffer = config.socket_send_buffer;
    let listener = axum::serve::ListenerExt::tap_io(listener, move |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
        if send_buffer > 0 {
            let _ = socket2::SockRef::from(&*tcp).set_send_buffer_size(send_buffer);
        }
    });
    tracing::info!(%address, plugins = %config.plugins_dir.display(), data = %config.data_dir.display(), "owlery serving");
    // Tests and scripts read this line to find the port.
    println!("owlery listening on http://{address}");

    if config.auth.enabled {
        tracing::info!("authentication is on");
    }
    let auth = Arc::new(crate::auth::Auth::new(config.auth.clone()));
    let (socketio, io) = crate::socketio::layer(auth.clone(), store.clone());
    let bridge = tokio::spawn(crate::socketio::bridge(io, hub.subscribe()));
    let state = AppState { auth, log, plugins: plugins.clone(), hub, routing, backend };
    axum::serve(listener, router(state).layer(socketio)).with_graceful_shutdown(shutdown).await?;
    bridge.abort();
    drop(watcher);
    tracing::info!("stopping plugins");
    tokio::task::spawn_blocking(move || plugins.stop_all()).await?;
    forwarder.abort();
    if let Some(mirror) = mirror {
        mirror.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Append outbox entries (plugin publishes, dead letters) to the log in order, then drop
/// them from the outbox. A crash in between appends them again with the same ids, which
/// the log deduplicates.
async fn forward_outbox(store: Arc<Store>, log: Arc<dyn EventLog>, wake: Arc<Notify>) {
    loop {
        let entries = match store.outbox_peek(256) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!(error = %e, "reading the outbox failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(last) = entries.last().map(|(seq, _)| *seq) else {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        let items = entries.into_iter().map(|(_, item)| item).collect();
        match log.append(items).await {
            Ok(_) => {
                if let Err(e) = store.outbox_remove_through(last) {
                    tracing::error!(error = %e, "clearing the outbox failed");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "forwarding the outbox to the log failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
