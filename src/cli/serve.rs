//! `warden serve`: the agent.

use super::*;
pub(super) fn serve(config: &Config) -> Result<ExitCode, Failure> {
    let server = config
        .server
        .clone()
        .ok_or_else(|| Failure("config: no [server] section".into()))?;
    let backends = open_backends(config)?;
    let store = open_store(config)?;
    // Counters of the HTTPS listener (connections, refusals, timeouts), for metrics.
    let server_stats = Arc::new(nfv_warden::api::ServerStats::default());
    let tls = nfv_warden::api::tls_config_with_stats(
        &server,
        &backends,
        &client_roots(config),
        &server_stats,
    )?;
    let mut limits = nfv_warden::api::ServerLimits::from_config(&server);
    limits.max_connections = nfv_warden::api::fit_connections_to_file_limit(limits.max_connections);
    let cmf = match &config.cmf {
        Some(_) => Some(Arc::new(
            nfv_warden::cmf::Cmf::new(config, &backends, store.clone()).map_err(Failure)?,
        )),
        None => None,
    };
    // Blocking threads run the CSR pipeline and key-layer calls: CPU and device work that
    // more threads than a few per core do not speed up, and each idle thread keeps its own
    // malloc arena (RSS). Callers beyond this queue.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .map_err(|e| Failure(format!("tokio runtime: {e}")))?;
    runtime.block_on(async move {
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
        let (stop_admin, admin_stopped) = tokio::sync::watch::channel(false);
        if let Some(sm) = &sm {
            let socket = admin_socket(config);
            let sm_admin = sm.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    nfv_warden::api::admin::serve(&socket, sm_admin, admin_stopped).await
                {
                    tracing::error!(error = %e, socket = %socket.display(), "admin socket");
                }
            });
        }
        // Type=notify: systemd starts dependants only once we listen.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        println!("listening on https://{addr}");
        let app = nfv_warden::api::router(nfv_warden::api::AppState {
            backends,
            store,
            cmf,
            sm: sm.clone(),
        });
        // The callback endpoint is served from here on: subscribe only now (IFA 033 6.2).
        if let Some(sm) = &sm {
            sm.start();
        }
        nfv_warden::api::serve(listener, tls, app, limits, server_stats, async {
            nfv_warden::api::termination_signal().await;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            let _ = stop_admin.send(true);
        })
        .await;
        Ok::<(), Failure>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
