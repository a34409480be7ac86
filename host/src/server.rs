//! Assembles the host: log, store, runtime, plugins, outbox forwarder, HTTP delivery and
//! HTTP front, and shuts them down in order.
//!
//! `serve` takes a bound listener and a shutdown future (as in tokio's mini-redis), so a test
//! or an embedding program can start a host on port 0 in-process; `run` binds the
//! configured address for the binary. Background tasks get one cancellation token and are
//! awaited, not aborted, on the way out.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, LogBackend};
use crate::fanout::{FANOUT_TOPIC, Hub};
use crate::http::{AppState, router};
use crate::keys::HostKey;
use crate::log::embedded::EmbeddedLog;
use crate::log::iggy::IggyLog;
use crate::log::{EventLog, LogError};
use crate::plugins::{Plugins, RunnerDeps};
use crate::presence::Presence;
use crate::routing::Routing;
use crate::runtime::{Runtime, RuntimeError};
use crate::store::{Store, StoreError};

/// Why the host could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("opening the log in {dir}: {source}")]
    OpenLog { dir: PathBuf, source: LogError },
    #[error("creating topics: {0}")]
    Topics(LogError),
    #[error("opening the store in {dir}: {source}")]
    OpenStore { dir: PathBuf, source: StoreError },
    #[error("starting the wasm runtime: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("the plugins directory {dir}: {source}")]
    PluginsDir { dir: PathBuf, source: std::io::Error },
    #[error("watching {dir}: {source}")]
    Watch { dir: PathBuf, source: notify::Error },
    #[error("binding {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
    #[error("serving HTTP: {0}")]
    Http(std::io::Error),
    #[error("{0}")]
    Key(#[from] crate::keys::KeyError),
    #[error("a host task panicked: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Bind the configured address and serve until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
    config.validate()?;
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| ServeError::Bind { address: config.listen, source })?;
    serve(config, listener, shutdown).await
}

/// Serve on `listener` until `shutdown` resolves, then stop everything in order.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate()?;
    let routing = Arc::new(Routing::from_config(&config.routing).map_err(ConfigError::from)?);
    let (log, backend) = open_log(&config)?;
    let shared_fanout = log.is_shared();
    let mut topics = routing.topics();
    topics.extend(config.extra_topics.iter().cloned());
    topics.push(crate::topics::DEAD_LETTERS.to_owned());
    topics.push(crate::topics::HTTP.to_owned());
    if shared_fanout {
        topics.push(FANOUT_TOPIC.to_owned());
    }
    log.ensure_topics(&topics).await.map_err(ServeError::Topics)?;
    let key = host_key(&config)?;
    let store = open_store(&config, shared_fanout, &key)?;
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let presence = if config.presence.enabled {
        let (presence, publisher) = Presence::start(&config.presence, log.clone(), routing.clone());
        tasks.spawn(until(stop.clone(), publisher));
        presence
    } else {
        Presence::disabled()
    };
    let hub = Hub::new(store.clone(), config.client_limits(), shared_fanout, presence);
    if shared_fanout {
        tasks.spawn(until(
            stop.clone(),
            crate::fanout::mirror::mirror(log.clone(), store.clone(), hub.clone(), key.clone()),
        ));
    }
    let outbox = Arc::new(Notify::new());
    let host_id = store.host_id().map_err(|source| ServeError::OpenStore { dir: config.data_dir.clone(), source })?;
    // Plugins' HTTP requests: taken in from the log, then sent (see `delivery`).
    let (due, pending) = tokio::sync::mpsc::unbounded_channel();
    tasks.spawn(until(stop.clone(), crate::delivery::claim::claim(log.clone(), store.clone(), key.clone(), due)));
    tasks.spawn(until(
        stop.clone(),
        crate::delivery::worker::deliver(
            store.clone(),
            key.clone(),
            outbox.clone(),
            pending,
            config.http_per_destination,
        ),
    ));
    let deps = Arc::new(RunnerDeps {
        runtime: Arc::new(Runtime::new(
            &config.data_dir.join("cache"),
            Duration::from_millis(config.compile_timeout_ms),
        )?),
        log: log.clone(),
        store: store.clone(),
        routing: routing.clone(),
        key,
        hub: hub.clone(),
        outbox: outbox.clone(),
        host_id,
        tokio: tokio::runtime::Handle::current(),
    });
    let (plugins, watcher) = start_plugins(deps, &config).await?;
    tasks.spawn(crate::outbox::forward(store.clone(), log.clone(), outbox, stop.clone()));

    let address = listener.local_addr().map_err(ServeError::Http)?;
    tracing::info!(%address, plugins = %config.plugins_dir.display(), data = %config.data_dir.display(), "owlery serving");
    // Tests and scripts read this line to find the port.
    println!("owlery listening on http://{address}");
    if config.auth.enabled {
        tracing::info!("authentication is on");
    }
    let auth = Arc::new(crate::auth::Auth::new(config.auth.clone()));
    let (socketio, bridge) = crate::fanout::socketio::layer(auth.clone(), hub.clone());
    tasks.spawn(until(stop.clone(), crate::fanout::socketio::bridge(bridge, hub.subscribe())));
    let max_upload = config.max_upload_mb << 20;
    let producer_topics = routing.topics().into_iter().chain(config.extra_topics.iter().cloned()).collect();
    let state = AppState {
        auth,
        log,
        plugins: plugins.clone(),
        hub,
        routing,
        backend,
        max_upload,
        producer_topics,
        store: store.clone(),
        ready_max_spool_depth: config.ready_max_spool_depth,
        samples: Arc::default(),
    };
    tasks.spawn(until(stop.clone(), crate::http::admin::sample_forever(state.clone())));
    // With each connection's address (presence budgets clients without a user by address).
    let app = router(state, socketio).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(tuned(listener, config.socket_send_buffer), app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServeError::Http)?;

    drop(watcher);
    tracing::info!("stopping plugins");
    tokio::task::spawn_blocking(move || plugins.stop_all()).await?;
    stop.cancel();
    while let Some(done) = tasks.join_next().await {
        done?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Run `task` until it ends or `stop` is cancelled.
async fn until(stop: CancellationToken, task: impl Future<Output = ()>) {
    tokio::select! {
        _ = task => {}
        _ = stop.cancelled() => {}
    }
}

/// The configured log backend, and its name for the status endpoint.
fn open_log(config: &Config) -> Result<(Arc<dyn EventLog>, &'static str), ServeError> {
    match config.log {
        LogBackend::Embedded => {
            let dir = config.data_dir.join("log");
            let log =
                EmbeddedLog::open(&dir, config.partitions).map_err(|source| ServeError::OpenLog { dir, source })?;
            Ok((Arc::new(log), "embedded"))
        }
        LogBackend::Iggy => {
            tracing::info!(
                address = %config.iggy.address(),
                stream = %config.iggy.stream,
                "using Iggy. Zero loss across an Iggy crash needs the server to save every batch: \
                 IGGY_SYSTEM_PARTITION_MESSAGES_REQUIRED_TO_SAVE=1 and IGGY_SYSTEM_PARTITION_ENFORCE_FSYNC=true \
                 (Owlery cannot read the server's settings to check)"
            );
            let dir = config.data_dir.join("iggy");
            let log =
                IggyLog::open(&dir, config.iggy.settings()).map_err(|source| ServeError::OpenLog { dir, source })?;
            Ok((Arc::new(log), "iggy"))
        }
    }
}

fn open_store(config: &Config, shared_fanout: bool, key: &HostKey) -> Result<Arc<Store>, ServeError> {
    let max_age = Duration::from_secs(config.fanout_max_age_secs);
    let mut store = Store::open(&config.data_dir, config.fanout_retention, max_age)
        .map_err(|source| ServeError::OpenStore { dir: config.data_dir.clone(), source })?;
    if shared_fanout {
        store.share_fanout(crate::fanout::mirror::encoder(key.clone()));
    }
    Ok(Arc::new(store))
}

/// The key of output ids and fan-out signatures: from `cluster_secret`; else, on Iggy, from
/// the credentials every host on that stream has; else one kept in the data directory.
fn host_key(config: &Config) -> Result<HostKey, ServeError> {
    if let Some(secret) = &config.cluster_secret {
        return Ok(HostKey::from_secret(secret.as_bytes()));
    }
    match config.log {
        LogBackend::Embedded => Ok(HostKey::load_or_create(&config.data_dir.join("host.key"))?),
        LogBackend::Iggy => {
            let iggy = &config.iggy;
            if iggy.password == crate::config::IggyConfig::default().password {
                tracing::warn!(
                    "no cluster_secret, and Iggy's password is the default one: anyone who can reach Iggy can \
                     predict output ids and sign fan-out records. Set cluster_secret (the same on every host)"
                );
            }
            Ok(HostKey::from_iggy_credentials(&iggy.username, &iggy.password, &iggy.stream))
        }
    }
}

/// Watch the plugins directory, then load what is in it (watching first, so that nothing
/// written while the directory is read is missed).
async fn start_plugins(
    deps: Arc<RunnerDeps>,
    config: &Config,
) -> Result<(Arc<Plugins>, notify::RecommendedWatcher), ServeError> {
    let dir = config.plugins_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| ServeError::PluginsDir { dir: dir.clone(), source })?;
    let plugins = Arc::new(Plugins::new(deps, dir.clone()));
    let watcher = crate::plugins::watcher::watch(plugins.clone())
        .map_err(|source| ServeError::Watch { dir: dir.clone(), source })?;
    let loading = plugins.clone();
    tokio::task::spawn_blocking(move || loading.load_dir())
        .await?
        .map_err(|source| ServeError::PluginsDir { dir, source })?;
    Ok((plugins, watcher))
}

/// Every accepted connection without Nagle's delay and, if configured, with a smaller send
/// buffer (a client that stops reading is noticed sooner).
fn tuned(
    listener: TcpListener,
    send_buffer: usize,
) -> axum::serve::TapIo<TcpListener, impl FnMut(&mut tokio::net::TcpStream) + Send + 'static> {
    axum::serve::ListenerExt::tap_io(listener, move |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
        if send_buffer > 0 {
            let _ = socket2::SockRef::from(&*tcp).set_send_buffer_size(send_buffer);
        }
    })
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called (inside
/// the runtime), not when the future is first polled: a SIGTERM that arrives while the
/// host is still starting then stops it cleanly instead of killing it.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            match (interrupt, terminate) {
                (Ok(mut interrupt), Ok(mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
