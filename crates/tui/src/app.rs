//! The TUI's state and its update function.
//!
//! Everything here is pure: [`App::update`] takes a [`Msg`] (a key, a tick,
//! or the answer of a request made earlier) and returns the [`Effect`]s to
//! perform (requests to the daemon). The runtime in `lib.rs` performs them
//! in the background and feeds their answers back as messages, so the UI
//! never waits on the daemon.

use crate::form::CreateForm;
use crate::logview::LogView;
use banger_api::{CreateVmRequest, LogSource, PortInfo, VmStats};
use banger_model::{VmId, VmRecord, VmState};
use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

/// A VM as listed, with what the list refresh learnt about it.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRow {
    pub vm: VmRecord,
    /// Seconds the VMM has been running, when it runs and the daemon said.
    pub uptime_seconds: Option<f64>,
}

/// Stats and ports of the selected VM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Details {
    pub stats: Option<Result<VmStats, String>>,
    /// `None` until asked; not asked for VMs that do not run.
    pub ports: Option<Result<Vec<PortInfo>, String>>,
}

/// A lifecycle action on one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Restart,
    Delete,
}

impl Action {
    /// Progressive form, for "stopping calm-otter".
    pub fn doing(self) -> &'static str {
        match self {
            Action::Start => "starting",
            Action::Stop => "stopping",
            Action::Restart => "restarting",
            Action::Delete => "deleting",
        }
    }

    pub fn done(self) -> &'static str {
        match self {
            Action::Start => "started",
            Action::Stop => "stopped",
            Action::Restart => "restarted",
            Action::Delete => "deleted",
        }
    }

    /// Why the action makes no sense in `state`, if it does not.
    fn refusal(self, state: VmState) -> Option<&'static str> {
        match (self, state) {
            (Action::Start, VmState::Running | VmState::Starting) => Some("is already running"),
            (Action::Stop, VmState::Stopped) => Some("is already stopped"),
            (Action::Restart, VmState::Stopped | VmState::Creating) => {
                Some("is not running: start it with s")
            }
            _ => None,
        }
    }
}

/// What the screen is doing besides showing the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Waiting for y/n before deleting.
    ConfirmDelete {
        id: VmId,
        name: String,
    },
    Create(CreateForm),
}

/// The one-line status under the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub text: String,
    pub error: bool,
}

/// Inputs of [`App::update`].
#[derive(Debug)]
pub enum Msg {
    Key(KeyEvent),
    /// Time to refresh from the daemon.
    Tick,
    List(Result<Vec<VmRow>, String>),
    Details {
        id: VmId,
        details: Details,
    },
    /// Bytes of the log stream `generation`.
    Log {
        generation: u64,
        chunk: Vec<u8>,
    },
    /// The log stream `generation` ended (the VM is gone, or an error).
    LogEnded {
        generation: u64,
        error: Option<String>,
    },
    Images(Vec<String>),
    ActionDone {
        id: VmId,
        name: String,
        action: Action,
        result: Result<(), String>,
    },
    CreateProgress(String),
    CreateDone(Result<VmRecord, String>),
}

/// Requests for the runtime to perform.
#[derive(Debug, Clone)]
pub enum Effect {
    RefreshList,
    RefreshDetails {
        id: VmId,
        /// Ask the guest for its listening ports (only when it runs).
        ports: bool,
    },
    /// Replace the log stream with one of `id`'s log (none when `None`).
    FollowLogs {
        generation: u64,
        target: Option<(VmId, LogSource)>,
    },
    LoadImages,
    Act {
        id: VmId,
        name: String,
        action: Action,
    },
    Create(CreateVmRequest),
}

impl PartialEq for Effect {
    fn eq(&self, other: &Self) -> bool {
        use Effect::*;
        match (self, other) {
            (RefreshList, RefreshList) | (LoadImages, LoadImages) => true,
            (RefreshDetails { id: a, ports: p }, RefreshDetails { id: b, ports: q }) => {
                a == b && p == q
            }
            (
                FollowLogs {
                    generation: g,
                    target: t,
                },
                FollowLogs {
                    generation: h,
                    target: u,
                },
            ) => g == h && t == u,
            (
                Act {
                    id: a,
                    name: n,
                    action: x,
                },
                Act {
                    id: b,
                    name: m,
                    action: y,
                },
            ) => a == b && n == m && x == y,
            // The API type has no PartialEq: compare what it would send.
            (Create(a), Create(b)) => {
                (
                    &a.name,
                    &a.image,
                    a.vcpu,
                    a.memory_mib,
                    &a.disk_size,
                    a.start,
                    a.nat,
                ) == (
                    &b.name,
                    &b.image,
                    b.vcpu,
                    b.memory_mib,
                    &b.disk_size,
                    b.start,
                    b.nat,
                )
            }
            _ => false,
        }
    }
}

/// Ticks between detail refreshes (stats and ports are heavier than the list).
const DETAIL_EVERY_TICKS: u32 = 2;

/// The whole state of the TUI.
#[derive(Debug)]
pub struct App {
    pub vms: Vec<VmRow>,
    /// Index into `vms`.
    pub selected: Option<usize>,
    /// The VM the details and logs belong to.
    details_for: Option<VmId>,
    /// Its state when details were last asked for: a change asks again.
    details_state: Option<VmState>,
    pub details: Details,
    pub log: LogView,
    pub log_source: LogSource,
    /// What the current log stream follows: VM, its VMM pid (the console
    /// file starts over at each boot) and source.
    log_key: Option<(VmId, Option<u32>, LogSource)>,
    log_generation: u64,
    /// Why the log stream ended, when it did with an error.
    pub log_error: Option<String>,
    pub mode: Mode,
    pub status: Option<Status>,
    /// Last list refresh error: the daemon is unreachable or failing.
    pub list_error: Option<String>,
    /// Whether a list answer has arrived yet.
    pub loaded: bool,
    /// VMs with an action under way, and which.
    pub busy: Vec<(VmId, Action)>,
    /// Names of known images, for the create form.
    pub images: Vec<String>,
    /// Creates under way.
    pub creating: usize,
    list_in_flight: bool,
    details_in_flight: bool,
    ticks: u32,
    pub quit: bool,
}

impl App {
    pub fn new() -> Self {
        App {
            vms: Vec::new(),
            selected: None,
            details_for: None,
            details_state: None,
            details: Details::default(),
            log: LogView::default(),
            log_source: LogSource::Console,
            log_key: None,
            log_generation: 0,
            log_error: None,
            mode: Mode::Normal,
            status: None,
            list_error: None,
            loaded: false,
            busy: Vec::new(),
            images: Vec::new(),
            creating: 0,
            list_in_flight: false,
            details_in_flight: false,
            ticks: 0,
            quit: false,
        }
    }

    /// The effects to perform at start-up.
    pub fn init(&mut self) -> Vec<Effect> {
        self.list_in_flight = true;
        vec![Effect::RefreshList]
    }

    pub fn selected_vm(&self) -> Option<&VmRow> {
        self.selected.and_then(|i| self.vms.get(i))
    }

    pub fn busy_with(&self, id: &VmId) -> Option<Action> {
        self.busy.iter().find(|(b, _)| b == id).map(|(_, a)| *a)
    }

    /// Handles one message; returns what to ask the daemon.
    pub fn update(&mut self, msg: Msg) -> Vec<Effect> {
        let mut fx = Vec::new();
        match msg {
            Msg::Key(k) => self.key(k, &mut fx),
            Msg::Tick => {
                self.ticks = self.ticks.wrapping_add(1);
                if !self.list_in_flight {
                    self.list_in_flight = true;
                    fx.push(Effect::RefreshList);
                }
                if self.ticks.is_multiple_of(DETAIL_EVERY_TICKS) {
                    self.refresh_details(&mut fx);
                }
            }
            Msg::List(result) => {
                self.list_in_flight = false;
                match result {
                    Ok(rows) => {
                        self.list_error = None;
                        self.loaded = true;
                        let prev_id = self.selected_vm().map(|r| r.vm.id.clone());
                        self.selected = reselect(prev_id.as_ref(), self.selected, &rows);
                        self.vms = rows;
                    }
                    Err(e) => self.list_error = Some(e),
                }
            }
            Msg::Details { id, details } => {
                if self.details_for.as_ref() == Some(&id) {
                    self.details_in_flight = false;
                    self.details = details;
                }
            }
            Msg::Log { generation, chunk } => {
                if generation == self.log_generation {
                    self.log.push(&chunk);
                }
            }
            Msg::LogEnded { generation, error } => {
                if generation == self.log_generation {
                    self.log_error = error;
                }
            }
            Msg::Images(names) => self.images = names,
            Msg::ActionDone {
                id,
                name,
                action,
                result,
            } => {
                self.busy.retain(|(b, _)| *b != id);
                self.status = Some(match result {
                    Ok(()) => Status {
                        text: format!("{} {name}", action.done()),
                        error: false,
                    },
                    Err(e) => Status {
                        text: format!("{} {name} failed: {e}", action.doing()),
                        error: true,
                    },
                });
                self.force_refresh(&mut fx);
            }
            Msg::CreateProgress(text) => {
                self.status = Some(Status { text, error: false });
            }
            Msg::CreateDone(result) => {
                self.creating = self.creating.saturating_sub(1);
                self.status = Some(match result {
                    Ok(vm) => Status {
                        text: format!("created {} ({})", vm.name, vm.state),
                        error: false,
                    },
                    Err(e) => Status {
                        text: format!("create failed: {e}"),
                        error: true,
                    },
                });
                self.force_refresh(&mut fx);
            }
        }
        self.follow_selection(&mut fx);
        fx
    }

    /// Refreshes the list now, unless a refresh is already under way.
    fn force_refresh(&mut self, fx: &mut Vec<Effect>) {
        if !self.list_in_flight {
            self.list_in_flight = true;
            fx.push(Effect::RefreshList);
        }
    }

    fn refresh_details(&mut self, fx: &mut Vec<Effect>) {
        if self.details_in_flight {
            return;
        }
        if let Some(row) = self.selected_vm() {
            let id = row.vm.id.clone();
            let ports = row.vm.state == VmState::Running;
            self.details_in_flight = true;
            fx.push(Effect::RefreshDetails { id, ports });
        }
    }

    /// Points details and the log stream at the selected VM when the
    /// selection (or the selected VM's boot, or the log source) changed.
    fn follow_selection(&mut self, fx: &mut Vec<Effect>) {
        let sel = self.selected_vm().map(|r| (r.vm.id.clone(), r.vm.pid));
        let sel_id = sel.as_ref().map(|(id, _)| id.clone());
        let sel_state = self.selected_vm().map(|r| r.vm.state);
        if sel_id != self.details_for {
            self.details_for = sel_id;
            self.details = Details::default();
            self.details_in_flight = false;
            self.details_state = sel_state;
            self.refresh_details(fx);
        } else if sel_state != self.details_state {
            // Stopped or booted: stats and ports changed now, not at the
            // next periodic refresh.
            self.details_state = sel_state;
            self.details_in_flight = false;
            self.refresh_details(fx);
        }
        let key = sel.map(|(id, pid)| (id, pid, self.log_source));
        // A VM that stopped keeps the log of its last boot on screen; only
        // a new boot (a new pid) starts the stream over.
        let same_boot = matches!(
            (&key, &self.log_key),
            (Some((id, None, src)), Some((old, _, old_src))) if id == old && src == old_src
        );
        if key != self.log_key && !same_boot {
            self.log_generation += 1;
            self.log = LogView::default();
            self.log_error = None;
            fx.push(Effect::FollowLogs {
                generation: self.log_generation,
                target: key.as_ref().map(|(id, _, src)| (id.clone(), *src)),
            });
            self.log_key = key;
        }
    }

    fn key(&mut self, k: KeyEvent, fx: &mut Vec<Effect>) {
        if k.kind == KeyEventKind::Release {
            return;
        }
        if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
            self.quit = true;
            return;
        }
        match std::mem::replace(&mut self.mode, Mode::Normal) {
            Mode::Normal => self.key_normal(k, fx),
            Mode::ConfirmDelete { id, name } => match k.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => {
                    self.act(id, name, Action::Delete, fx);
                }
                KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc => {
                    self.status = Some(Status {
                        text: format!("kept {name}"),
                        error: false,
                    });
                }
                _ => self.mode = Mode::ConfirmDelete { id, name },
            },
            Mode::Create(mut form) => {
                match k.code {
                    KeyCode::Esc => return,
                    KeyCode::Tab | KeyCode::Down => form.next(),
                    KeyCode::BackTab | KeyCode::Up => form.prev(),
                    KeyCode::Backspace => form.backspace(),
                    KeyCode::Enter => match form.validate() {
                        Ok(req) => {
                            self.creating += 1;
                            self.status = Some(Status {
                                text: format!(
                                    "creating {}...",
                                    req.name.as_deref().unwrap_or("a VM")
                                ),
                                error: false,
                            });
                            fx.push(Effect::Create(req));
                            return;
                        }
                        Err(e) => form.error = Some(e),
                    },
                    KeyCode::Char(c) => {
                        form.push(c);
                        form.error = None;
                    }
                    _ => {}
                }
                self.mode = Mode::Create(form);
            }
        }
    }

    fn key_normal(&mut self, k: KeyEvent, fx: &mut Vec<Effect>) {
        let len = self.vms.len();
        let move_to = |i: usize| if len == 0 { None } else { Some(i.min(len - 1)) };
        match k.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected = move_to(self.selected.map_or(0, |i| i + 1));
            }
            KeyCode::Up | KeyCode::Char('k') => {
                self.selected = move_to(self.selected.map_or(0, |i| i.saturating_sub(1)));
            }
            KeyCode::Home | KeyCode::Char('g') => self.selected = move_to(0),
            KeyCode::End | KeyCode::Char('G') => self.selected = move_to(usize::MAX),
            KeyCode::Char('s') => self.act_on_selected(Action::Start, fx),
            KeyCode::Char('x') => self.act_on_selected(Action::Stop, fx),
            KeyCode::Char('r') => self.act_on_selected(Action::Restart, fx),
            KeyCode::Char('d') => {
                if let Some(row) = self.selected_vm() {
                    self.mode = Mode::ConfirmDelete {
                        id: row.vm.id.clone(),
                        name: row.vm.name.to_string(),
                    };
                }
            }
            KeyCode::Char('c') => {
                self.mode = Mode::Create(CreateForm::default());
                fx.push(Effect::LoadImages);
            }
            KeyCode::Char('l') => {
                self.log_source = match self.log_source {
                    LogSource::Console => LogSource::Vmm,
                    LogSource::Vmm => LogSource::Console,
                };
            }
            _ => {}
        }
    }

    fn act_on_selected(&mut self, action: Action, fx: &mut Vec<Effect>) {
        let Some(row) = self.selected_vm() else {
            return;
        };
        let (id, name, state) = (row.vm.id.clone(), row.vm.name.to_string(), row.vm.state);
        if let Some(why) = action.refusal(state) {
            self.status = Some(Status {
                text: format!("{name} {why}"),
                error: true,
            });
            return;
        }
        self.act(id, name, action, fx);
    }

    fn act(&mut self, id: VmId, name: String, action: Action, fx: &mut Vec<Effect>) {
        if let Some(other) = self.busy_with(&id) {
            self.status = Some(Status {
                text: format!("{name} is busy {}", other.doing()),
                error: true,
            });
            return;
        }
        self.busy.push((id.clone(), action));
        self.status = Some(Status {
            text: format!("{} {name}...", action.doing()),
            error: false,
        });
        fx.push(Effect::Act { id, name, action });
    }
}

impl Default for App {
    fn default() -> Self {
        Self::new()
    }
}

/// The selection after a refresh: the same VM where it is now, else the
/// row at the same position (the next VM after a delete), else none.
pub fn reselect(prev: Option<&VmId>, prev_index: Option<usize>, rows: &[VmRow]) -> Option<usize> {
    if rows.is_empty() {
        return None;
    }
    if let Some(i) = prev.and_then(|id| rows.iter().position(|r| &r.vm.id == id)) {
        return Some(i);
    }
    Some(prev_index.unwrap_or(0).min(rows.len() - 1))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use banger_model::{Provenance, SpecValue, VmBackend, VmName, VmSpec};

    pub(crate) fn vm(name: &str, state: VmState) -> VmRow {
        VmRow {
            vm: VmRecord {
                id: VmId(format!("{:0<32}", name.replace('-', ""))),
                name: VmName::parse(name).expect("name"),
                image: "debian-bookworm".into(),
                state,
                backend: VmBackend::Qemu,
                spec: VmSpec {
                    vcpu: SpecValue::new(2, Provenance::Flag),
                    memory_mib: SpecValue::new(1024, Provenance::Flag),
                    disk_bytes: SpecValue::new(8 << 30, Provenance::Flag),
                },
                dir: "/tmp/vm".into(),
                pid: (state == VmState::Running).then_some(4242),
                nat: false,
                ip: Some(std::net::Ipv4Addr::new(172, 16, 0, 2)),
                tap: None,
                ssh_port: None,
                initramfs: Default::default(),
                created_at: "2026-01-01T00:00:00Z".into(),
                last_error: None,
                start: Default::default(),
            },
            uptime_seconds: (state == VmState::Running).then_some(75.0),
        }
    }

    pub(crate) fn key(c: KeyCode) -> Msg {
        Msg::Key(KeyEvent::new(c, KeyModifiers::NONE))
    }

    fn loaded(rows: Vec<VmRow>) -> (App, Vec<Effect>) {
        let mut app = App::new();
        app.init();
        let fx = app.update(Msg::List(Ok(rows)));
        (app, fx)
    }

    fn acts(fx: &[Effect]) -> Vec<(String, Action)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Act { name, action, .. } => Some((name.clone(), *action)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn first_list_selects_the_first_vm_and_follows_it() {
        let (app, fx) = loaded(vec![
            vm("alpha", VmState::Running),
            vm("beta", VmState::Stopped),
        ]);
        assert_eq!(app.selected, Some(0));
        let alpha = app.vms[0].vm.id.clone();
        assert!(fx.contains(&Effect::RefreshDetails {
            id: alpha.clone(),
            ports: true
        }));
        assert!(fx.contains(&Effect::FollowLogs {
            generation: 1,
            target: Some((alpha, LogSource::Console))
        }));
    }

    #[test]
    fn selection_sticks_to_the_vm_across_refreshes() {
        let (mut app, _) = loaded(vec![
            vm("alpha", VmState::Running),
            vm("beta", VmState::Running),
        ]);
        app.update(key(KeyCode::Down));
        assert_eq!(app.selected_vm().map(|r| r.vm.name.as_str()), Some("beta"));
        // A new VM sorts before it: the selection moves with beta.
        let fx = app.update(Msg::List(Ok(vec![
            vm("aardvark", VmState::Creating),
            vm("alpha", VmState::Running),
            vm("beta", VmState::Running),
        ])));
        assert_eq!(app.selected, Some(2));
        assert!(
            !fx.iter().any(|e| matches!(e, Effect::FollowLogs { .. })),
            "same VM, same boot: the log stream is kept: {fx:?}"
        );
        // beta is deleted: the row at its position (none after it) is taken.
        app.update(Msg::List(Ok(vec![
            vm("aardvark", VmState::Running),
            vm("alpha", VmState::Running),
        ])));
        assert_eq!(app.selected, Some(1));
        app.update(Msg::List(Ok(vec![])));
        assert_eq!(app.selected, None);
    }

    #[test]
    fn reselect_rules() {
        let rows = vec![vm("a", VmState::Running), vm("b", VmState::Running)];
        let b = rows[1].vm.id.clone();
        let gone = VmId("f".repeat(32));
        assert_eq!(reselect(Some(&b), Some(0), &rows), Some(1));
        assert_eq!(reselect(Some(&gone), Some(5), &rows), Some(1));
        assert_eq!(reselect(None, None, &rows), Some(0));
        assert_eq!(reselect(Some(&b), Some(1), &[]), None);
    }

    #[test]
    fn movement_is_clamped() {
        let (mut app, _) = loaded(vec![vm("a", VmState::Running), vm("b", VmState::Running)]);
        app.update(key(KeyCode::Up));
        assert_eq!(app.selected, Some(0));
        app.update(key(KeyCode::Char('G')));
        assert_eq!(app.selected, Some(1));
        app.update(key(KeyCode::Char('j')));
        assert_eq!(app.selected, Some(1));
        app.update(key(KeyCode::Char('g')));
        assert_eq!(app.selected, Some(0));
    }

    #[test]
    fn stop_key_stops_the_selected_vm_once() {
        let (mut app, _) = loaded(vec![vm("alpha", VmState::Running)]);
        let fx = app.update(key(KeyCode::Char('x')));
        assert_eq!(acts(&fx), [("alpha".to_string(), Action::Stop)]);
        // Pressed again while the stop runs: refused, nothing sent.
        let fx = app.update(key(KeyCode::Char('x')));
        assert!(acts(&fx).is_empty());
        assert!(app.status.as_ref().is_some_and(|s| s.error));
        let id = app.vms[0].vm.id.clone();
        let fx = app.update(Msg::ActionDone {
            id,
            name: "alpha".into(),
            action: Action::Stop,
            result: Ok(()),
        });
        assert!(app.busy.is_empty());
        assert_eq!(
            app.status.as_ref().map(|s| s.text.as_str()),
            Some("stopped alpha")
        );
        assert!(fx.contains(&Effect::RefreshList));
    }

    #[test]
    fn actions_that_make_no_sense_are_refused_locally() {
        let (mut app, _) = loaded(vec![vm("alpha", VmState::Stopped)]);
        assert!(acts(&app.update(key(KeyCode::Char('x')))).is_empty());
        assert!(acts(&app.update(key(KeyCode::Char('r')))).is_empty());
        assert_eq!(
            acts(&app.update(key(KeyCode::Char('s')))),
            [("alpha".to_string(), Action::Start)]
        );
    }

    #[test]
    fn delete_needs_confirmation() {
        let (mut app, _) = loaded(vec![vm("alpha", VmState::Running)]);
        assert!(acts(&app.update(key(KeyCode::Char('d')))).is_empty());
        assert!(matches!(app.mode, Mode::ConfirmDelete { .. }));
        // Other keys keep asking; n cancels.
        assert!(acts(&app.update(key(KeyCode::Char('x')))).is_empty());
        assert!(matches!(app.mode, Mode::ConfirmDelete { .. }));
        app.update(key(KeyCode::Char('n')));
        assert_eq!(app.mode, Mode::Normal);
        app.update(key(KeyCode::Char('d')));
        assert_eq!(
            acts(&app.update(key(KeyCode::Char('y')))),
            [("alpha".to_string(), Action::Delete)]
        );
        assert_eq!(app.mode, Mode::Normal);
    }

    #[test]
    fn create_form_submits_only_valid_input() {
        let (mut app, _) = loaded(vec![]);
        let fx = app.update(key(KeyCode::Char('c')));
        assert!(fx.contains(&Effect::LoadImages));
        for c in "Bad".chars() {
            app.update(key(KeyCode::Char(c)));
        }
        let fx = app.update(key(KeyCode::Enter));
        assert!(fx.iter().all(|e| !matches!(e, Effect::Create(_))));
        let Mode::Create(form) = &app.mode else {
            panic!("form closed on invalid input");
        };
        assert!(form.error.is_some());
        for _ in 0..3 {
            app.update(key(KeyCode::Backspace));
        }
        for c in "web-1".chars() {
            app.update(key(KeyCode::Char(c)));
        }
        app.update(key(KeyCode::Tab));
        app.update(key(KeyCode::Tab));
        app.update(key(KeyCode::Char('4')));
        let fx = app.update(key(KeyCode::Enter));
        let req = fx
            .iter()
            .find_map(|e| match e {
                Effect::Create(r) => Some(r.clone()),
                _ => None,
            })
            .expect("create effect");
        assert_eq!(req.name.as_deref(), Some("web-1"));
        assert_eq!(req.vcpu, Some(4));
        assert_eq!(app.mode, Mode::Normal);
        assert_eq!(app.creating, 1);
        // q typed in the form is text, not quit.
        app.update(key(KeyCode::Char('c')));
        app.update(key(KeyCode::Char('q')));
        assert!(!app.quit);
        app.update(key(KeyCode::Esc));
        assert_eq!(app.mode, Mode::Normal);
    }

    #[test]
    fn q_and_ctrl_c_quit() {
        let (mut app, _) = loaded(vec![]);
        app.update(key(KeyCode::Char('q')));
        assert!(app.quit);
        let (mut app, _) = loaded(vec![]);
        app.update(key(KeyCode::Char('c')));
        app.update(Msg::Key(KeyEvent::new(
            KeyCode::Char('c'),
            KeyModifiers::CONTROL,
        )));
        assert!(app.quit, "Ctrl-C quits even from the form");
    }

    #[test]
    fn log_stream_restarts_on_a_new_boot_or_source_and_drops_stale_chunks() {
        let (mut app, _) = loaded(vec![vm("alpha", VmState::Running)]);
        app.update(Msg::Log {
            generation: 1,
            chunk: b"boot 1\n".to_vec(),
        });
        assert_eq!(app.log.tail(5), ["boot 1"]);
        // Stopped: the last boot's log stays; details are asked again.
        let fx = app.update(Msg::List(Ok(vec![vm("alpha", VmState::Stopped)])));
        assert!(!fx.iter().any(|e| matches!(e, Effect::FollowLogs { .. })));
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::RefreshDetails { ports: false, .. }))
        );
        assert_eq!(app.log.tail(5), ["boot 1"]);
        // Booted again with a new VMM: a fresh stream.
        let mut again = vm("alpha", VmState::Running);
        again.vm.pid = Some(5555);
        let fx = app.update(Msg::List(Ok(vec![again])));
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::FollowLogs { generation: 2, .. }))
        );
        assert!(app.log.is_empty());
        app.update(Msg::Log {
            generation: 1,
            chunk: b"stale\n".to_vec(),
        });
        assert!(app.log.is_empty());
        let fx = app.update(key(KeyCode::Char('l')));
        let id = app.vms[0].vm.id.clone();
        assert!(fx.contains(&Effect::FollowLogs {
            generation: 3,
            target: Some((id, LogSource::Vmm))
        }));
    }

    #[test]
    fn refreshes_do_not_pile_up() {
        let (mut app, _) = loaded(vec![vm("alpha", VmState::Running)]);
        let fx = app.update(Msg::Tick);
        assert!(fx.contains(&Effect::RefreshList));
        let fx = app.update(Msg::Tick);
        assert!(
            !fx.iter()
                .any(|e| matches!(e, Effect::RefreshList | Effect::RefreshDetails { .. })),
            "list and details still in flight: {fx:?}"
        );
        app.update(Msg::List(Ok(vec![vm("alpha", VmState::Running)])));
        let id = app.vms[0].vm.id.clone();
        app.update(Msg::Details {
            id,
            details: Details::default(),
        });
        app.update(Msg::Tick);
        app.update(Msg::List(Ok(vec![vm("alpha", VmState::Running)])));
        let fx = app.update(Msg::Tick);
        assert!(fx.contains(&Effect::RefreshList));
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::RefreshDetails { .. }))
        );
    }

    #[test]
    fn details_of_a_previous_selection_are_dropped() {
        let (mut app, _) = loaded(vec![
            vm("alpha", VmState::Running),
            vm("beta", VmState::Running),
        ]);
        let alpha = app.vms[0].vm.id.clone();
        app.update(key(KeyCode::Down));
        app.update(Msg::Details {
            id: alpha,
            details: Details {
                stats: Some(Err("late".into())),
                ports: None,
            },
        });
        assert_eq!(app.details, Details::default());
    }
}
