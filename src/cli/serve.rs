//! `warden serve`: the agent.

use super::*;
pub(super) fn serve(config: &Config) -> Result<ExitCode, Failure> {
    let server = config
        .server
        .clone()
        .ok_or_else(|| Failure::config("config: no [server] section".into()))?;
    read_secrets(config)?;
    let backends = open_backends(config)?;
    let store = open_store(config)?;
    // Counters of the HTTPS listener (connections, refusals, timeouts), for metrics.
    let server_stats = Arc::new(nfv_warden::api::ServerStats::default());
    let tls = nfv_warden::api::tls_config_with_stats(
        &server,
        &backends,
        &client_roots(config),
        &server_stats,
    )
    .map_err(Failure::serve)?;
    let trust = nfv_warden::api::ClientTrust::from_config(config).map_err(Failure::serve)?;
    let mut limits = nfv_warden::api::ServerLimits::from_config(&server);
    limits.max_connections = nfv_warden::api::fit_connections_to_file_limit(limits.max_connections);
    let cmf = match &config.cmf {
        Some(_) => Some(Arc::new(
            nfv_warden::cmf::Cmf::new(config, &backends, store.clone()).map_err(Failure)?,
        )),
        None => None,
    };
    nfv_warden::metrics::global().prepare(config, cmf.as_deref().map_or(&[], |c| c.cas()));
    // Blocking threads run the CSR pipeline and key-layer calls: CPU and device work that
    // more threads than a few per core do not speed up, and each idle thread keeps its own
    // malloc arena (RSS). Callers beyond this queue.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .map_err(|e| Failure(format!("tokio runtime: {e}")))?;
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(server.listen)
            .await
            .map_err(|e| Failure(format!("listen on {}: {e}", server.listen)))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, tls_key = %server.tls_key, "serving HTTPS");
        let sm = match &config.sm {
            Some(_) => Some(
                nfv_warden::sm::Sm::new(config, &backends, store.clone(), addr).map_err(Failure)?,
            ),
            None => None,
        };
        let direct = match &cmf {
            Some(cmf) => nfv_warden::cmf::direct::Direct::new(config, &backends, cmf.clone(), addr)
                .map_err(Failure)?,
            None => None,
        };
        // The admin socket, always: the operator's commands reach the store and devices the
        // agent holds through it.
        let (stop_admin, admin_stopped) = tokio::sync::watch::channel(false);
        // Readiness: a background probe of every key and the store (src/probe.rs).
        let probe = nfv_warden::probe::Probe::start(
            nfv_warden::probe::key_targets(config),
            backends.clone(),
            store.clone(),
            nfv_warden::probe::ProbeSettings::from_config(config),
        );
        let health = nfv_warden::api::health::Health::new(probe.clone(), &backends);
        if let Some(metrics) = &config.metrics {
            let listener = tokio::net::TcpListener::bind(metrics.listen)
                .await
                .map_err(|e| Failure(format!("metrics listener on {}: {e}", metrics.listen)))?;
            let bound = listener.local_addr()?;
            tracing::info!(addr = %bound, "serving metrics (plain HTTP) at /metrics");
            let mut stopped = stop_admin.subscribe();
            tokio::spawn(nfv_warden::api::health::serve_metrics(
                listener,
                health.clone(),
                nfv_warden::api::health::metrics_limits(metrics),
                async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                },
            ));
        }
        // Revocation (CRLs, OCSP) on its own plain-HTTP listener, bound before anything is
        // issued: certificates carry its URLs.
        if let (Some(cmf), Some(cmf_config)) = (&cmf, &config.cmf) {
            if cmf.crls().enabled() {
                let settings = &cmf_config.revocation;
                let listen = settings.listen.unwrap_or_else(|| {
                    let port = if server.listen.port() == 0 { 0 } else { 8080 };
                    std::net::SocketAddr::new(server.listen.ip(), port)
                });
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .map_err(|e| Failure(format!("revocation listener on {listen}: {e}")))?;
                let bound = listener.local_addr()?;
                let base = match &settings.base_url {
                    Some(url) => url.clone(),
                    None => nfv_warden::api::revocation::default_base_url(bound, &server)
                        .map_err(Failure)?,
                };
                tracing::info!(addr = %bound, url = %base, "serving CRLs and OCSP (plain HTTP)");
                cmf.set_revocation_base_url(base);
                let mut stopped = stop_admin.subscribe();
                tokio::spawn(nfv_warden::api::revocation::serve(
                    listener,
                    nfv_warden::api::revocation::routes(cmf.clone()),
                    settings.max_connections,
                    std::time::Duration::from_secs(settings.read_timeout_seconds),
                    Arc::new(nfv_warden::api::revocation::RevocationStats::default()),
                    async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    },
                ));
            }
            let mut stopped = stop_admin.subscribe();
            tokio::spawn(cmf.clone().run_crl_task(async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }));
        }
        let admin = nfv_warden::api::admin::AdminState {
            config: Arc::new(config.clone()),
            backends: backends.clone(),
            store: store.clone(),
            cmf: cmf.clone(),
            sm: sm.clone(),
        };
        let socket = admin_socket(config);
        let admin_task = match nfv_warden::api::admin::bind(&socket) {
            Ok(listener) => Some(tokio::spawn(async move {
                nfv_warden::api::admin::serve(listener, &socket, admin, admin_stopped).await
            })),
            // The CA keeps serving; only the operator's commands are missing.
            Err(e) => {
                tracing::error!(error = %e, socket = %socket.display(), "admin socket");
                None
            }
        };
        // SIGTERM/SIGINT handlers in place before anyone is told we are ready.
        let stop_signal = nfv_warden::api::termination_signal();
        // Type=notify: systemd starts dependants only once we listen.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        nfv_warden::api::health::notify_systemd(&probe, addr);
        println!("listening on https://{addr}");
        if let (Some(sm), Some(cmf)) = (&sm, &cmf) {
            sm.attach_cmf(cmf.clone());
        }
        let app = nfv_warden::api::router(nfv_warden::api::AppState {
            backends,
            store,
            cmf,
            sm: sm.clone(),
            direct: direct.clone(),
            health,
        });
        // The callback endpoint is served from here on: subscribe only now (IFA 033 6.2).
        if let Some(sm) = &sm {
            sm.start();
        }
        if let Some(direct) = &direct {
            direct.start();
        }
        nfv_warden::api::serve(listener, tls, trust, app, limits, server_stats, async {
            stop_signal.await;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            let _ = stop_admin.send(true);
        })
        .await;
        // The admin task removes its socket once told to stop: let it, before the runtime
        // goes (a bounded wait: a command in progress does not hold up the exit).
        if let Some(task) = admin_task {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        }
        Ok::<(), Failure>(())
    });
    // A readiness probe may still be stuck inside a hung device (a blocking thread no one
    // can cancel): do not wait for it forever on the way out.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    served?;
    Ok(ExitCode::SUCCESS)
}
