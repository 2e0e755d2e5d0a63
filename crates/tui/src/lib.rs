//! `banger tui`: a terminal dashboard of the daemon's VMs.
//!
//! The state and its update function ([`app`]) are pure; this module runs
//! them: it reads keys, performs the [`app::Effect`]s as background tasks
//! against the daemon API and feeds their answers back as [`app::Msg`]s, so
//! a slow daemon never freezes the screen.

pub mod app;
pub mod form;
pub mod logview;
mod term;
pub mod ui;

use app::{Action, App, Details, Effect, Msg, VmRow};
use banger_api::{Client, CreateVmEvent, LogSource};
use banger_model::{VmId, VmState};
use crossterm::event::{Event, EventStream};
use futures::StreamExt;
use std::future::Future;
use std::io::IsTerminal;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

/// How often the list (and every other time the details) is refreshed.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);
/// Bound on one list or details request; the UI shows the error and the
/// next tick tries again.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the per-VM uptime lookups of a list refresh.
const UPTIME_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the TUI could not run or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TuiError {
    #[error("banger tui needs a terminal on stdin and stdout")]
    NotATerminal,
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
    #[error("the TUI panicked; the message is above")]
    Panicked,
}

/// Runs the TUI against the daemon behind `client` until the user quits
/// (q, Ctrl-C) or the process gets SIGTERM/SIGHUP. The terminal is
/// restored on every way out, panics included.
pub async fn run(client: Client) -> Result<(), TuiError> {
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        return Err(TuiError::NotATerminal);
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;

    let mut guard = term::TerminalGuard::enter()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Msg>();
    let mut runner = Runner::new(client, tx);
    let mut app = App::new();
    let mut events = EventStream::new();
    let mut tick = tokio::time::interval(REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    let fx = app.init();
    runner.perform(fx);

    let result = loop {
        if term::panicked() {
            break Err(TuiError::Panicked);
        }
        if let Err(e) = guard.terminal.draw(|f| ui::render(f, &app)) {
            break Err(e.into());
        }
        let msg = tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(Event::Key(k))) => Msg::Key(k),
                // Resize and the like: just redraw.
                Some(Ok(_)) => continue,
                Some(Err(e)) => break Err(e.into()),
                None => break Ok(()),
            },
            Some(m) = rx.recv() => m,
            _ = tick.tick() => Msg::Tick,
            _ = sigterm.recv() => break Ok(()),
            _ = sighup.recv() => break Ok(()),
        };
        let fx = app.update(msg);
        runner.perform(fx);
        // Take whatever else is waiting before drawing once for all of it
        // (a log stream can deliver many chunks at once).
        while let Ok(m) = rx.try_recv() {
            let fx = app.update(m);
            runner.perform(fx);
        }
        if app.quit {
            break Ok(());
        }
    };
    runner.abort_all();
    drop(guard);
    result
}

/// Performs effects as background tasks.
struct Runner {
    client: Client,
    tx: UnboundedSender<Msg>,
    log_task: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Runner {
    fn new(client: Client, tx: UnboundedSender<Msg>) -> Self {
        Runner {
            client,
            tx,
            log_task: None,
            tasks: Vec::new(),
        }
    }

    fn spawn(&mut self, fut: impl Future<Output = ()> + Send + 'static) {
        self.tasks.retain(|t| !t.is_finished());
        self.tasks.push(tokio::spawn(fut));
    }

    fn abort_all(&mut self) {
        for t in self.tasks.drain(..).chain(self.log_task.take()) {
            t.abort();
        }
    }

    fn perform(&mut self, effects: Vec<Effect>) {
        for e in effects {
            self.perform_one(e);
        }
    }

    fn perform_one(&mut self, effect: Effect) {
        let (c, tx) = (self.client.clone(), self.tx.clone());
        match effect {
            Effect::RefreshList => self.spawn(async move {
                let _ = tx.send(Msg::List(list(&c).await));
            }),
            Effect::RefreshDetails { id, ports } => self.spawn(async move {
                let details = details(&c, &id, ports).await;
                let _ = tx.send(Msg::Details { id, details });
            }),
            Effect::FollowLogs { generation, target } => {
                if let Some(t) = self.log_task.take() {
                    t.abort();
                }
                if let Some((id, source)) = target {
                    self.log_task = Some(tokio::spawn(follow_logs(c, tx, generation, id, source)));
                }
            }
            Effect::LoadImages => self.spawn(async move {
                if let Ok(Ok(images)) = tokio::time::timeout(REQUEST_TIMEOUT, c.list_images()).await
                {
                    let _ = tx.send(Msg::Images(images.into_iter().map(|i| i.name).collect()));
                }
            }),
            Effect::Act { id, name, action } => self.spawn(async move {
                let r = id.as_str();
                let result = match action {
                    Action::Start => c.start_vm(r).await,
                    Action::Stop => c.stop_vm(r).await,
                    Action::Restart => c.restart_vm(r).await,
                    Action::Delete => c.delete_vm(r).await,
                };
                let _ = tx.send(Msg::ActionDone {
                    id,
                    name,
                    action,
                    result: result.map(|_| ()).map_err(|e| e.to_string()),
                });
            }),
            Effect::Create(req) => self.spawn(async move {
                let progress = tx.clone();
                let result = c
                    .create_vm(&req, |ev| {
                        let text = match ev {
                            CreateVmEvent::Planned(banger_api::PlannedVm { name, spec }) => {
                                format!("creating {name}: {}", spec.summary())
                            }
                            CreateVmEvent::Progress(p) => {
                                format!("creating: {}: {}", p.phase, p.message)
                            }
                            CreateVmEvent::Warning(w) => {
                                format!("creating: warning: {}", w.message)
                            }
                            CreateVmEvent::Done(_) | CreateVmEvent::Error(_) => return,
                        };
                        let _ = progress.send(Msg::CreateProgress(text));
                    })
                    .await;
                let _ = tx.send(Msg::CreateDone(result.map_err(|e| e.to_string())));
            }),
        }
    }
}

/// The VMs, with the uptime of those that run.
async fn list(c: &Client) -> Result<Vec<VmRow>, String> {
    let vms = match tokio::time::timeout(REQUEST_TIMEOUT, c.list_vms()).await {
        Ok(r) => r.map_err(|e| e.to_string())?,
        Err(_) => return Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
    };
    let uptimes = futures::future::join_all(vms.iter().map(|vm| {
        let running = vm.state == VmState::Running;
        async move {
            if !running {
                return None;
            }
            let stats = tokio::time::timeout(UPTIME_TIMEOUT, c.vm_stats(vm.id.as_str(), false));
            match stats.await {
                Ok(Ok(s)) => s.vmm.map(|p| p.uptime_seconds),
                _ => None,
            }
        }
    }))
    .await;
    Ok(vms
        .into_iter()
        .zip(uptimes)
        .map(|(vm, uptime_seconds)| VmRow { vm, uptime_seconds })
        .collect())
}

/// Stats (with the guest's view) and, for a running VM, its ports.
async fn details(c: &Client, id: &VmId, ports: bool) -> Details {
    let stats = bounded("stats", c.vm_stats(id.as_str(), true));
    let port_list = async {
        if ports {
            Some(bounded("ports", c.vm_ports(id.as_str())).await)
        } else {
            None
        }
    };
    let (stats, ports) = tokio::join!(stats, port_list);
    Details {
        stats: Some(stats),
        ports,
    }
}

/// `req` within [`REQUEST_TIMEOUT`], its error as text.
async fn bounded<T>(
    what: &str,
    req: impl Future<Output = Result<T, banger_api::ClientError>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, req).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("{what}: no answer within {REQUEST_TIMEOUT:?}")),
    }
}

async fn follow_logs(
    c: Client,
    tx: UnboundedSender<Msg>,
    generation: u64,
    id: VmId,
    source: LogSource,
) {
    let chunks = tx.clone();
    let result = c
        .logs(
            id.as_str(),
            &banger_api::LogsQuery {
                source,
                follow: true,
                ..Default::default()
            },
            |chunk| {
                let _ = chunks.send(Msg::Log {
                    generation,
                    chunk: chunk.to_vec(),
                });
            },
        )
        .await;
    let _ = tx.send(Msg::LogEnded {
        generation,
        error: result.err().map(|e| e.to_string()),
    });
}
