//! Drawing the state. ratatui diffs each frame against the last, so only
//! changed cells reach the terminal and a redraw never flickers.

use crate::app::{App, Mode, VmRow};
use crate::form::{CreateForm, Field};
use banger_api::{LogSource, VmStats};
use banger_model::{ByteSize, VmState};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Position, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Clear, Paragraph, Row, Table, TableState, Wrap};

/// The key help of the dashboard.
pub const HELP: &str =
    "↑↓/jk select  s start  x stop  r restart  d delete  c create  l console/vmm log  q quit";
const HELP_CONFIRM: &str = "y delete  n/Esc keep";
const HELP_FORM: &str = "Tab/↓ next field  Shift-Tab/↑ previous  Enter create  Esc cancel";

/// Draws the whole screen.
pub fn render(f: &mut Frame, app: &App) {
    let [header, top, logs, status, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Percentage(50),
        Constraint::Min(5),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(f.area());
    render_header(f, header, app);
    let [list, details] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(top);
    render_list(f, list, app);
    render_details(f, details, app);
    render_logs(f, logs, app);
    render_status(f, status, app);
    let help_text = match app.mode {
        Mode::Normal => HELP,
        Mode::ConfirmDelete { .. } => HELP_CONFIRM,
        Mode::Create(_) => HELP_FORM,
    };
    f.render_widget(
        Paragraph::new(help_text).style(Style::new().reversed()),
        help,
    );
    match &app.mode {
        Mode::Normal => {}
        Mode::ConfirmDelete { name, .. } => render_confirm(f, name),
        Mode::Create(form) => render_form(f, form, &app.images),
    }
}

fn render_header(f: &mut Frame, area: Rect, app: &App) {
    let running = app
        .vms
        .iter()
        .filter(|r| r.vm.state == VmState::Running)
        .count();
    let mut spans = vec![
        Span::from(" banger ").bold(),
        Span::from(format!("{} VMs, {running} running", app.vms.len())),
    ];
    if app.creating > 0 {
        spans.push(Span::from(format!(", {} creating", app.creating)).yellow());
    }
    if let Some(e) = &app.list_error {
        spans.push(Span::from(format!("   daemon: {e}")).red());
    }
    f.render_widget(Line::from(spans), area);
}

fn state_style(state: VmState) -> Style {
    match state {
        VmState::Running => Style::new().fg(Color::Green),
        VmState::Stopped => Style::new().fg(Color::DarkGray),
        VmState::Error => Style::new().fg(Color::Red),
        VmState::Creating | VmState::Starting | VmState::Stopping => Style::new().fg(Color::Yellow),
    }
}

/// The IP column: the bridge address, or how to reach a user-mode VM.
fn ip_text(row: &VmRow) -> String {
    match (row.vm.ssh_port, row.vm.ip) {
        (Some(_), _) => "user-mode".into(),
        (None, Some(ip)) => ip.to_string(),
        (None, None) => "-".into(),
    }
}

/// `42s`, `3m12s`, `2h05m`, `1d03h`.
pub fn uptime(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn render_list(f: &mut Frame, area: Rect, app: &App) {
    let block = Block::bordered().title(" VMs ");
    if app.vms.is_empty() {
        let text = if !app.loaded {
            "loading..."
        } else {
            "no VMs: press c to create one"
        };
        f.render_widget(Paragraph::new(text).dim().block(block), area);
        return;
    }
    let name_w = app
        .vms
        .iter()
        .map(|r| r.vm.name.as_str().len())
        .max()
        .unwrap_or(4)
        .max(4) as u16;
    let rows = app.vms.iter().map(|r| {
        let state = match app.busy_with(&r.vm.id) {
            Some(a) => Span::from(format!("{}…", a.doing())).yellow(),
            None => Span::styled(r.vm.state.as_str(), state_style(r.vm.state)),
        };
        Row::new(vec![
            Cell::from(r.vm.name.to_string()),
            Cell::from(state),
            Cell::from(ip_text(r)),
            Cell::from(r.vm.spec.vcpu.value.to_string()),
            Cell::from(ByteSize::mib(r.vm.spec.memory_mib.value).to_string()),
            Cell::from(r.uptime_seconds.map(uptime).unwrap_or_else(|| "-".into())),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(name_w),
            Constraint::Length(11),
            Constraint::Length(15),
            Constraint::Length(4),
            Constraint::Length(6),
            Constraint::Length(7),
        ],
    )
    .header(Row::new(["NAME", "STATE", "IP", "VCPU", "MEMORY", "UPTIME"]).bold())
    .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
    .highlight_symbol("> ")
    .block(block);
    let mut state = TableState::default().with_selected(app.selected);
    f.render_stateful_widget(table, area, &mut state);
}

/// The details pane's lines for the selected VM.
pub fn detail_lines(app: &App) -> Vec<Line<'static>> {
    let Some(row) = app.selected_vm() else {
        return vec![Line::from("no VM selected").dim()];
    };
    let v = &row.vm;
    let kv =
        |k: &str, val: String| Line::from(vec![Span::from(format!("{k:<7}")).bold(), val.into()]);
    let mut lines = vec![
        kv("name", v.name.to_string()),
        kv("id", v.id.short().to_string()),
        Line::from(vec![
            Span::from(format!("{:<7}", "state")).bold(),
            Span::styled(v.state.as_str(), state_style(v.state)),
        ]),
        kv("image", v.image.clone()),
        kv(
            "spec",
            format!(
                "{} vcpu, {} memory, {} disk ({})",
                v.spec.vcpu.value,
                ByteSize::mib(v.spec.memory_mib.value),
                ByteSize(v.spec.disk_bytes.value),
                v.backend
            ),
        ),
        kv(
            "net",
            match (v.ssh_port, v.ip) {
                (Some(p), _) => format!("user-mode, ssh on 127.0.0.1:{p}"),
                (None, Some(ip)) => format!("{ip} ({}.vm), nat {}", v.name, onoff(v.nat)),
                (None, None) => "-".into(),
            },
        ),
    ];
    if let Some(e) = &v.last_error {
        lines.push(Line::from(vec![
            Span::from(format!("{:<7}", "error")).bold(),
            Span::from(e.clone()).red(),
        ]));
    }
    match &app.details.stats {
        None => lines.push(Line::from("stats  loading...").dim()),
        Some(Err(e)) => lines.push(Line::from(format!("stats  {e}")).red()),
        Some(Ok(s)) => lines.extend(stats_lines(s, &kv)),
    }
    match &app.details.ports {
        None if v.state == VmState::Running => lines.push(Line::from("ports  loading...").dim()),
        None => {}
        Some(Err(e)) => lines.push(Line::from(format!("ports  {e}")).red()),
        Some(Ok(ports)) if ports.is_empty() => lines.push(kv("ports", "none listening".into())),
        Some(Ok(ports)) => {
            lines.push(Line::from("ports").bold());
            for p in ports {
                let process = match (p.pid, &p.command) {
                    (Some(pid), Some(c)) => format!("{c} ({pid})"),
                    (Some(pid), None) => pid.to_string(),
                    _ => "-".into(),
                };
                let endpoint = p.url.clone().or_else(|| p.note.clone()).unwrap_or_default();
                lines.push(Line::from(format!(
                    "  {:>5} {:<9} {:<14} {endpoint}",
                    p.port, p.addr, process
                )));
            }
        }
    }
    lines
}

fn onoff(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

fn stats_lines(s: &VmStats, kv: &dyn Fn(&str, String) -> Line<'static>) -> Vec<Line<'static>> {
    let mut lines = Vec::new();
    match &s.vmm {
        Some(p) => lines.push(kv(
            "vmm",
            format!(
                "pid {}, up {}, cpu {:.1}s ({:.1}%), rss {}",
                p.pid,
                uptime(p.uptime_seconds),
                p.cpu_seconds,
                p.cpu_percent,
                ByteSize(p.rss_bytes).human()
            ),
        )),
        None => lines.push(kv("vmm", "not running".into())),
    }
    if let Some(g) = &s.guest {
        lines.push(kv(
            "guest",
            format!(
                "mem {} of {} free, load {:.2}",
                ByteSize(g.mem_available_bytes).human(),
                ByteSize(g.mem_total_bytes).human(),
                g.load1
            ),
        ));
        lines.push(kv(
            "",
            format!(
                "/ {} of {}, /root {} of {}",
                ByteSize(g.root_used_bytes).human(),
                ByteSize(g.root_total_bytes).human(),
                ByteSize(g.work_used_bytes).human(),
                ByteSize(g.work_total_bytes).human()
            ),
        ));
    }
    let own: u64 = s
        .disks
        .iter()
        .filter(|d| !d.shared)
        .map(|d| d.allocated_bytes)
        .sum();
    if !s.disks.is_empty() {
        lines.push(kv("disks", format!("{} on host", ByteSize(own).human())));
    }
    lines
}

fn render_details(f: &mut Frame, area: Rect, app: &App) {
    f.render_widget(
        Paragraph::new(detail_lines(app))
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(" details ")),
        area,
    );
}

fn render_logs(f: &mut Frame, area: Rect, app: &App) {
    let source = match app.log_source {
        LogSource::Console => "console",
        LogSource::Vmm => "vmm",
    };
    let title = match app.selected_vm() {
        Some(r) => format!(" {source} log: {} ", r.vm.name),
        None => format!(" {source} log "),
    };
    let inner_h = area.height.saturating_sub(2) as usize;
    let mut lines: Vec<Line> = Vec::new();
    if let Some(e) = &app.log_error {
        lines.push(Line::from(format!("log stream ended: {e}")).red());
    }
    let room = inner_h.saturating_sub(lines.len());
    let tail = app.log.tail(room);
    if tail.is_empty() && app.log_error.is_none() {
        lines.push(Line::from("(empty)").dim());
    }
    // The newest line last, like `tail -f`.
    lines.extend(tail.into_iter().map(Line::from));
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(title)),
        area,
    );
}

fn render_status(f: &mut Frame, area: Rect, app: &App) {
    if let Some(s) = &app.status {
        let style = if s.error {
            Style::new().fg(Color::Red)
        } else {
            Style::new()
        };
        f.render_widget(Paragraph::new(format!(" {}", s.text)).style(style), area);
    }
}

/// A centred rectangle of `w` x `h` cells, clipped to `area`.
fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

fn render_confirm(f: &mut Frame, name: &str) {
    let area = centered(f.area(), 52, 5);
    f.render_widget(Clear, area);
    f.render_widget(
        Paragraph::new(vec![
            Line::from(format!("Delete {name} and its disks?")),
            Line::from(""),
            Line::from("y delete   n keep").bold(),
        ])
        .block(Block::bordered().title(" delete ").red()),
        area,
    );
}

fn render_form(f: &mut Frame, form: &CreateForm, images: &[String]) {
    let area = centered(f.area(), 72, 12);
    f.render_widget(Clear, area);
    let block = Block::bordered().title(" create VM ");
    let inner = block.inner(area);
    f.render_widget(block, area);
    let mut lines = Vec::new();
    let mut cursor = None;
    for (i, field) in Field::ALL.iter().enumerate() {
        let value = form.value(*field);
        let focused = form.focus() == *field;
        let label = Span::from(format!(" {:<7}", field.label())).bold();
        let shown = if value.is_empty() && !focused {
            Span::from(field.hint()).dim()
        } else {
            Span::from(value.to_string())
        };
        let mut line = Line::from(vec![label, shown]);
        if focused {
            line = line.style(Style::new().add_modifier(Modifier::UNDERLINED));
            let x = inner.x + 8 + value.chars().count() as u16;
            cursor = Some(Position::new(
                x.min(inner.right().saturating_sub(1)),
                inner.y + i as u16,
            ));
        }
        lines.push(line);
    }
    lines.push(Line::from(""));
    if let Some(e) = &form.error {
        lines.push(Line::from(format!(" {}: {}", e.field.label(), e.message)).red());
    } else if form.focus() == Field::Image && !images.is_empty() {
        lines.push(Line::from(format!(" images: {}", images.join(", "))).dim());
    } else {
        lines.push(Line::from(format!(" {}", form.focus().hint())).dim());
    }
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), inner);
    if let Some(p) = cursor {
        f.set_cursor_position(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::tests::{key, vm};
    use crate::app::{Details, Msg};
    use crossterm::event::KeyCode;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn screen(app: &App, w: u16, h: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).expect("terminal");
        t.draw(|f| render(f, app)).expect("draw");
        let buf = t.backend().buffer();
        (0..h)
            .map(|y| (0..w).map(|x| buf[(x, y)].symbol()).collect::<String>())
            .collect()
    }

    fn app_with(rows: Vec<VmRow>) -> App {
        let mut app = App::new();
        app.init();
        app.update(Msg::List(Ok(rows)));
        app
    }

    #[test]
    fn vm_row_shows_state_ip_spec_and_uptime() {
        let app = app_with(vec![
            vm("calm-otter", VmState::Running),
            vm("idle-box", VmState::Stopped),
        ]);
        let lines = screen(&app, 140, 40);
        let row = lines
            .iter()
            .find(|l| l.contains("> calm-otter"))
            .unwrap_or_else(|| panic!("no selected calm-otter row:\n{}", lines.join("\n")));
        for want in ["running", "172.16.0.2", " 2 ", "1G", "1m15s"] {
            assert!(row.contains(want), "{want:?} missing from {row:?}");
        }
        let idle = lines
            .iter()
            .find(|l| l.contains("idle-box"))
            .expect("idle-box row");
        assert!(idle.contains("stopped"), "{idle}");
        assert!(lines.iter().any(|l| l.contains("console log: calm-otter")));
        assert!(
            lines
                .last()
                .is_some_and(|l| l.contains("x stop") && l.contains("q quit"))
        );
    }

    #[test]
    fn details_show_stats_and_ports() {
        let mut app = app_with(vec![vm("calm-otter", VmState::Running)]);
        let id = app.vms[0].vm.id.clone();
        app.update(Msg::Details {
            id,
            details: Details {
                stats: Some(Ok(VmStats {
                    name: "calm-otter".into(),
                    state: VmState::Running,
                    vcpu: 2,
                    memory_mib: 1024,
                    vmm: Some(banger_api::VmmProcessStats {
                        pid: 4242,
                        cpu_seconds: 12.5,
                        cpu_percent: 3.2,
                        rss_bytes: 400 << 20,
                        uptime_seconds: 3725.0,
                    }),
                    disks: vec![],
                    guest: None,
                })),
                ports: Some(Ok(vec![banger_api::PortInfo {
                    addr: "0.0.0.0".into(),
                    port: 8080,
                    pid: Some(99),
                    command: Some("python3".into()),
                    protocol: Some("http".into()),
                    url: Some("http://calm-otter.vm:8080/".into()),
                    note: None,
                }])),
            },
        });
        let text = screen(&app, 160, 40).join("\n");
        assert!(text.contains("pid 4242, up 1h02m"), "{text}");
        assert!(text.contains("http://calm-otter.vm:8080/"), "{text}");
    }

    #[test]
    fn busy_vm_shows_the_action_and_log_tail_is_shown() {
        let mut app = app_with(vec![vm("calm-otter", VmState::Running)]);
        app.update(key(KeyCode::Char('x')));
        app.update(Msg::Log {
            generation: 1,
            chunk: b"\x1b[0;32mwelcome\x1b[0m\r\nlogin: ".to_vec(),
        });
        let text = screen(&app, 140, 40).join("\n");
        assert!(text.contains("stopping…"), "{text}");
        assert!(text.contains("welcome"), "{text}");
        assert!(text.contains("login:"), "{text}");
        assert!(text.contains("stopping calm-otter..."), "{text}");
    }

    #[test]
    fn overlays_render() {
        let mut app = app_with(vec![vm("calm-otter", VmState::Running)]);
        app.update(key(KeyCode::Char('d')));
        let text = screen(&app, 120, 30).join("\n");
        assert!(text.contains("Delete calm-otter and its disks?"), "{text}");
        app.update(key(KeyCode::Esc));
        app.update(key(KeyCode::Char('c')));
        app.update(Msg::Images(vec!["debian-bookworm".into()]));
        let text = screen(&app, 120, 30).join("\n");
        assert!(text.contains("create VM"), "{text}");
        assert!(
            text.contains("generated when empty") || text.contains("name"),
            "{text}"
        );
        app.update(key(KeyCode::Tab));
        let text = screen(&app, 120, 30).join("\n");
        assert!(text.contains("images: debian-bookworm"), "{text}");
    }

    #[test]
    fn empty_and_unreachable_states_render() {
        let mut app = App::new();
        assert!(screen(&app, 100, 20).join("\n").contains("loading..."));
        app.update(Msg::List(Err("daemon socket /x does not answer".into())));
        assert!(
            screen(&app, 100, 20)
                .join("\n")
                .contains("daemon: daemon socket /x")
        );
        app.update(Msg::List(Ok(vec![])));
        assert!(
            screen(&app, 100, 20)
                .join("\n")
                .contains("press c to create")
        );
    }

    #[test]
    fn uptime_units() {
        assert_eq!(uptime(42.9), "42s");
        assert_eq!(uptime(192.0), "3m12s");
        assert_eq!(uptime(7500.0), "2h05m");
        assert_eq!(uptime(97200.0), "1d03h");
    }
}
