// banger web UI: a client of bangerd's JSON API (forwarded under /api).
// State-changing requests carry the page's token (see crates/web).
'use strict';

const TOKEN = document.querySelector('meta[name="banger-token"]').content;
const main = document.getElementById('main');
const enc = encodeURIComponent;

// ---- helpers -------------------------------------------------------------

/** Builds an element; strings become text nodes (never HTML). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(method, path, body, signal) {
  const opts = { method, headers: {}, signal };
  if (method !== 'GET' && method !== 'HEAD') opts.headers['x-banger-token'] = TOKEN;
  if (body !== undefined) {
    opts.headers['content-type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch('/api' + path, opts);
  if (!r.ok) {
    let msg = `${r.status} ${r.statusText}`;
    try {
      const e = await r.json();
      if (e && e.message) msg = e.message;
    } catch (_) { /* not JSON */ }
    const err = new Error(msg);
    err.status = r.status;
    throw err;
  }
  return r;
}

const getJson = async (path) => (await api('GET', path)).json();

function bytes(n) {
  if (n === null || n === undefined) return '-';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function duration(s) {
  s = Math.floor(s);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function when(rfc3339) {
  const d = new Date(rfc3339);
  return isNaN(d) ? rfc3339 : d.toLocaleString();
}

let toastTimer;
function toast(msg, kind) {
  const t = document.getElementById('toast');
  t.textContent = msg;
  t.className = kind || 'error';
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 8000);
}

function confirmDialog(text, okLabel) {
  const d = document.getElementById('confirm');
  document.getElementById('confirm-text').textContent = text;
  const ok = document.getElementById('confirm-ok');
  const cancel = document.getElementById('confirm-cancel');
  ok.textContent = okLabel || 'Delete';
  return new Promise((resolve) => {
    const done = (v) => () => {
      ok.onclick = cancel.onclick = d.oncancel = null;
      d.close();
      resolve(v);
    };
    ok.onclick = done(true);
    cancel.onclick = done(false);
    d.oncancel = done(false);
    d.showModal();
  });
}

/** Runs `fn` now and every `ms` until the returned stop function is called;
 * `stop.now()` runs it again at once (never two runs at the same time). */
function poll(fn, ms) {
  let stopped = false;
  let timer = null;
  let busy = false;
  let again = false;
  const tick = async () => {
    if (stopped) return;
    if (busy) { again = true; return; }
    busy = true;
    clearTimeout(timer);
    try { await fn(); } catch (e) { if (!stopped) toast(e.message); }
    busy = false;
    if (stopped) return;
    if (again) { again = false; tick(); return; }
    timer = setTimeout(tick, ms);
  };
  tick();
  const stop = () => { stopped = true; clearTimeout(timer); };
  stop.now = () => { clearTimeout(timer); tick(); };
  return stop;
}

function badge(state) {
  return h('span', { class: `state state-${state}`, dataset: { state } }, state);
}

// ---- operations ----------------------------------------------------------

const ops = [];
let opSeq = 0;

function renderOps() {
  const section = document.getElementById('ops');
  const list = document.getElementById('ops-list');
  section.hidden = ops.length === 0;
  list.replaceChildren(...ops.map((op) => {
    const elapsed = ((op.ended || Date.now()) - op.started) / 1000;
    const bar = op.transfer && op.status === 'running'
      ? h('progress', op.transfer.total
        ? { max: op.transfer.total, value: op.transfer.done }
        : {})
      : null;
    const detail = op.transfer && op.status === 'running'
      ? `${op.transfer.phase}: ${bytes(op.transfer.done)}${op.transfer.total ? ' / ' + bytes(op.transfer.total) : ''}`
      : op.message;
    return h('li', { class: `op op-${op.status}`, dataset: { op: op.id } },
      h('span', { class: 'op-title' }, op.title),
      h('span', { class: 'op-status' }, op.status),
      h('span', { class: 'op-time' }, duration(elapsed)),
      bar,
      h('div', { class: 'op-detail' }, detail || ''));
  }));
  if (ops.some((o) => o.status === 'done' || o.status === 'failed')) {
    list.append(h('li', {}, h('button', {
      type: 'button',
      class: 'link',
      onclick: () => {
        for (let i = ops.length - 1; i >= 0; i--) if (ops[i].status !== 'running') ops.splice(i, 1);
        renderOps();
      },
    }, 'clear finished')));
  }
}
setInterval(() => { if (ops.some((o) => o.status === 'running')) renderOps(); }, 1000);

function startOp(title) {
  const op = { id: ++opSeq, title, status: 'running', message: '', started: Date.now() };
  ops.unshift(op);
  if (ops.length > 12) ops.pop();
  const set = (fields) => { Object.assign(op, fields); renderOps(); };
  renderOps();
  return {
    note: (message) => set({ message, transfer: null }),
    transfer: (t) => set({ transfer: t }),
    done: (message) => set({ status: 'done', message: message || 'done', ended: Date.now() }),
    fail: (message) => {
      set({ status: 'failed', message, ended: Date.now() });
      toast(`${title}: ${message}`);
    },
  };
}

/** A long operation: POST, then read its NDJSON event stream to the end. */
async function streamOp(title, path, body) {
  const op = startOp(title);
  let outcome = null;
  try {
    const r = await api('POST', path, body);
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue; // keep-alive
        const ev = JSON.parse(line);
        if (ev.planned) {
          const s = ev.planned.spec;
          op.note(`planned ${ev.planned.name}: ${s.vcpu.value} vCPU, ${s.memory_mib.value} MiB, ${bytes(s.disk_bytes.value)} disk`);
        } else if (ev.progress) {
          op.note(`${ev.progress.phase}: ${ev.progress.message}`);
        } else if (ev.warning) {
          op.note(`warning: ${ev.warning.message}`);
        } else if (ev.transfer) {
          op.transfer(ev.transfer);
        } else if (ev.done) {
          outcome = { ok: ev.done };
          op.done(ev.done.name ? `${ev.done.name} ready` : 'done');
        } else if (ev.error) {
          outcome = { err: ev.error.message };
          op.fail(ev.error.message);
        }
      }
    }
    if (!outcome) op.fail('the daemon closed the stream before the operation finished');
  } catch (e) {
    op.fail(e.message);
  }
  return outcome && outcome.ok;
}

// ---- VM actions ----------------------------------------------------------

const PAST = { start: 'started', stop: 'stopped', restart: 'restarted', delete: 'deleted' };

async function vmAction(name, action, after) {
  if (action === 'delete'
    && !(await confirmDialog(`Delete VM ${name}? It is stopped and its disks are removed.`))) {
    return;
  }
  const op = startOp(`${action} ${name}`);
  try {
    if (action === 'delete') await api('DELETE', `/v1/vms/${enc(name)}`);
    else await api('POST', `/v1/vms/${enc(name)}/${action}`);
    op.done(`${name} ${PAST[action]}`);
    if (action === 'delete' && location.hash.startsWith('#/vm/')) location.hash = '#/';
  } catch (e) {
    op.fail(e.message);
  }
  if (after) after();
}

function vmButtons(vm, after) {
  const busy = ['creating', 'starting', 'stopping'].includes(vm.state);
  const can = {
    start: !busy && vm.state !== 'running',
    stop: vm.state === 'running',
    restart: vm.state === 'running',
    delete: vm.state !== 'creating',
  };
  return h('span', { class: 'actions' }, ...Object.keys(can).map((a) => h('button', {
    type: 'button',
    class: a === 'delete' ? 'danger' : null,
    disabled: !can[a],
    dataset: { action: a, vm: vm.name },
    onclick: (ev) => {
      ev.currentTarget.disabled = true;
      vmAction(vm.name, a, after);
    },
  }, a)));
}

// ---- pages ---------------------------------------------------------------

function vmsPage() {
  const table = h('table', { id: 'vms' });
  const form = createForm(() => stop.now());
  const toggle = h('button', {
    type: 'button',
    onclick: () => { form.hidden = !form.hidden; },
  }, 'New VM');
  main.replaceChildren(h('div', { class: 'title' }, h('h1', {}, 'VMs'), toggle), form, table);
  const stop = poll(async () => {
    const vms = await getJson('/v1/vms');
    const head = h('tr', {}, ...['Name', 'State', 'Image', 'vCPU', 'Memory', 'Address', 'Created', '']
      .map((c) => h('th', {}, c)));
    const rows = vms.map((vm) => h('tr', { dataset: { vm: vm.name, state: vm.state } },
      h('td', {}, h('a', { href: `#/vm/${enc(vm.name)}` }, vm.name)),
      h('td', {}, badge(vm.state)),
      h('td', {}, vm.image),
      h('td', { class: 'num' }, vm.spec.vcpu.value),
      h('td', { class: 'num' }, `${vm.spec.memory_mib.value} MiB`),
      h('td', {}, vm.ip || (vm.ssh_port ? `ssh 127.0.0.1:${vm.ssh_port}` : '-')),
      h('td', {}, when(vm.created_at)),
      h('td', {}, vmButtons(vm, () => stop.now()))));
    table.replaceChildren(h('thead', {}, head), h('tbody', {}, rows.length ? rows
      : h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'No VMs yet. Create one with "New VM" or `banger vm create`.'))));
  }, 2000);
  return { stop };
}

function createForm(after) {
  const images = h('select', { name: 'image' }, h('option', { value: '' }, '(default image)'));
  getJson('/v1/images').then((list) => {
    for (const img of list) images.append(h('option', { value: img.name }, img.name));
  }).catch((e) => toast(e.message));
  const field = (label, input) => h('label', {}, h('span', {}, label), input);
  const form = h('form', { class: 'card', id: 'create-form', hidden: true },
    h('h2', {}, 'New VM'),
    h('div', { class: 'fields' },
      field('Name', h('input', { name: 'name', placeholder: 'generated', pattern: '[a-z0-9]([a-z0-9-]*[a-z0-9])?', maxlength: 63 })),
      field('Image', images),
      field('vCPU', h('input', { name: 'vcpu', type: 'number', min: 1, max: 64, placeholder: 'default' })),
      field('Memory (MiB)', h('input', { name: 'memory', type: 'number', min: 128, step: 128, placeholder: 'default' })),
      field('Disk', h('input', { name: 'disk', placeholder: 'e.g. 16G' })),
      h('label', { class: 'check' }, h('input', { name: 'nat', type: 'checkbox' }), 'NAT (internet access)'),
      h('label', { class: 'check' }, h('input', { name: 'start', type: 'checkbox', checked: true }), 'Boot now')),
    h('button', { type: 'submit', class: 'primary' }, 'Create'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const f = new FormData(form);
    const num = (k) => (f.get(k) ? Number(f.get(k)) : null);
    const req = {
      name: f.get('name') || null,
      image: f.get('image') || null,
      vcpu: num('vcpu'),
      memory_mib: num('memory'),
      // The API takes sizes as banger prints them: 16G, 1536M.
      disk_size: (f.get('disk') || '').trim().toUpperCase() || null,
      nat: f.get('nat') === 'on',
      start: f.get('start') === 'on',
    };
    form.hidden = true;
    form.reset();
    setTimeout(after, 300);
    await streamOp(`create ${req.name || 'VM'}`, '/v1/vms', req);
    after();
  });
  return form;
}

function kv(rows) {
  return h('dl', { class: 'kv' }, ...rows.filter((r) => r).flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

function vmDetail(name) {
  const header = h('div', { class: 'title' });
  const overview = h('div', { class: 'card' });
  const ports = h('div', { class: 'card', id: 'ports' }, h('h2', {}, 'Ports'));
  const stats = h('div', { class: 'card', id: 'stats' }, h('h2', {}, 'Stats'));
  const logPre = h('pre', { id: 'log' });
  const logCard = h('div', { class: 'card wide' });
  main.replaceChildren(header, h('div', { class: 'grid' }, overview, stats, ports, logCard));

  let state = null;
  const stopVm = poll(async () => {
    let vm;
    try {
      vm = await getJson(`/v1/vms/${enc(name)}`);
    } catch (e) {
      if (e.status === 404) {
        header.replaceChildren(h('h1', {}, name), h('span', { class: 'muted' }, 'not found (deleted?)'));
        return;
      }
      throw e;
    }
    const wasRunning = state === 'running';
    state = vm.state;
    header.replaceChildren(h('h1', {}, vm.name), badge(vm.state), vmButtons(vm, () => {
      stopVm.now();
      if (stopStats) stopStats.now();
    }));
    header.dataset.vm = vm.name;
    header.dataset.state = vm.state;
    const spec = (v, unit) => `${v.value}${unit} (${v.source})`;
    overview.replaceChildren(h('h2', {}, 'Overview'), kv([
      ['State', vm.state],
      ['Image', vm.image],
      ['Backend', vm.backend],
      ['Address', vm.ip || '-'],
      vm.ssh_port ? ['ssh', `127.0.0.1:${vm.ssh_port}`] : null,
      ['DNS name', `${vm.name}.vm`],
      ['NAT', vm.nat ? 'yes' : 'no'],
      ['vCPU', spec(vm.spec.vcpu, '')],
      ['Memory', spec(vm.spec.memory_mib, ' MiB')],
      ['Disk', `${bytes(vm.spec.disk_bytes.value)} (${vm.spec.disk_bytes.source})`],
      ['VMM pid', vm.pid || '-'],
      ['Created', when(vm.created_at)],
      ['Id', vm.id],
      vm.last_error ? ['Last error', vm.last_error] : null,
    ]));
    if (vm.state === 'running' && !wasRunning && stopPorts) stopPorts.now();
  }, 3000);

  const stopStats = poll(async () => {
    if (state === null) return;
    const s = await getJson(`/v1/vms/${enc(name)}/stats?guest=${state === 'running'}`);
    const rows = [];
    if (s.vmm) {
      rows.push(['VMM CPU', `${s.vmm.cpu_percent.toFixed(1)}% of a core (${s.vmm.cpu_seconds.toFixed(1)} s)`]);
      rows.push(['VMM memory', bytes(s.vmm.rss_bytes)]);
      rows.push(['Uptime', duration(s.vmm.uptime_seconds)]);
    }
    if (s.guest) {
      const g = s.guest;
      rows.push(['Guest memory', `${bytes(g.mem_total_bytes - g.mem_available_bytes)} used of ${bytes(g.mem_total_bytes)}`]);
      rows.push(['Load (1 min)', g.load1.toFixed(2)]);
      rows.push(['/', `${bytes(g.root_used_bytes)} of ${bytes(g.root_total_bytes)}`]);
      rows.push(['/root', `${bytes(g.work_used_bytes)} of ${bytes(g.work_total_bytes)}`]);
    }
    for (const d of s.disks) {
      rows.push([`Disk ${d.role}`, `${bytes(d.allocated_bytes)} allocated of ${bytes(d.virtual_bytes)}${d.shared ? ' (shared)' : ''}`]);
    }
    stats.replaceChildren(h('h2', {}, 'Stats'), rows.length ? kv(rows) : h('p', { class: 'muted' }, 'No figures while stopped.'));
  }, 4000);

  const stopPorts = poll(async () => {
    if (state !== 'running') {
      ports.replaceChildren(h('h2', {}, 'Ports'), h('p', { class: 'muted' }, 'Listening ports show while the VM runs.'));
      return;
    }
    let list;
    try {
      list = await getJson(`/v1/vms/${enc(name)}/ports`);
    } catch (e) {
      ports.replaceChildren(h('h2', {}, 'Ports'), h('p', { class: 'muted' }, e.message));
      return;
    }
    const local = (p) => p.addr.startsWith('127.') || p.addr === '::1';
    const items = list.map((p) => {
      const url = p.url || `http://${name}.vm:${p.port}/`;
      return h('li', { dataset: { port: p.port } },
        local(p) ? h('span', {}, `${p.addr}:${p.port} (guest-local)`)
          : h('a', { href: url, target: '_blank', rel: 'noopener noreferrer' }, url),
        h('span', { class: 'muted' }, ` ${[p.protocol, p.command, p.note].filter(Boolean).join(' · ')}`));
    });
    ports.replaceChildren(h('h2', {}, 'Ports'), items.length ? h('ul', { class: 'ports' }, items)
      : h('p', { class: 'muted' }, 'No listening TCP ports.'));
  }, 5000);

  // Live log tail.
  let source = 'console';
  let abort = null;
  const LIMIT = 200000;
  const tail = async () => {
    if (abort) abort.abort();
    const ctl = new AbortController();
    abort = ctl;
    let text = '';
    logPre.textContent = '';
    try {
      const r = await api('GET', `/v1/vms/${enc(name)}/logs?source=${source}&follow=true`, undefined, ctl.signal);
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const atBottom = logPre.scrollTop + logPre.clientHeight >= logPre.scrollHeight - 20;
        // Drop terminal escapes and carriage returns of the serial console.
        text += dec.decode(value, { stream: true })
          .replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '').replace(/[\x1b\r]/g, '');
        if (text.length > LIMIT) text = text.slice(text.length - LIMIT);
        logPre.textContent = text;
        if (atBottom) logPre.scrollTop = logPre.scrollHeight;
      }
      if (abort === ctl) logPre.append(document.createTextNode('\n[log ended]'));
    } catch (e) {
      if (e.name !== 'AbortError') logPre.append(document.createTextNode(`\n[${e.message}]`));
    }
  };
  const tab = (src, label) => h('button', {
    type: 'button',
    class: src === source ? 'tab active' : 'tab',
    dataset: { log: src },
    onclick: () => { source = src; renderLogHead(); tail(); },
  }, label);
  const renderLogHead = () => logCard.replaceChildren(
    h('div', { class: 'title' }, h('h2', {}, 'Log'), tab('console', 'serial console'), tab('vmm', 'VMM'),
      h('button', { type: 'button', class: 'link', onclick: tail }, 'reload')),
    logPre);
  renderLogHead();
  tail();

  return {
    stop: () => {
      stopVm();
      stopStats();
      stopPorts();
      if (abort) abort.abort();
      abort = null;
    },
  };
}

function imagesPage() {
  const table = h('table', { id: 'images' });
  const pull = h('form', { class: 'card inline' },
    h('h2', {}, 'Pull an image'),
    h('input', { name: 'reference', required: true, placeholder: 'catalog name or registry/repo:tag' }),
    h('input', { name: 'name', placeholder: 'name (optional)' }),
    h('input', { name: 'kernel_ref', placeholder: 'kernel (OCI only)' }),
    h('button', { type: 'submit', class: 'primary' }, 'Pull'));
  const build = h('form', { class: 'card inline' },
    h('h2', {}, 'Build a Debian image'),
    h('input', { name: 'name', required: true, value: 'debian-bookworm' }),
    h('input', { name: 'suite', placeholder: 'suite (bookworm)' }),
    h('button', { type: 'submit' }, 'Build'));
  const opt = (f, k) => f.get(k) || null;
  pull.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const f = new FormData(pull);
    pull.reset();
    await streamOp(`pull ${f.get('reference')}`, '/v1/images/pull',
      { reference: f.get('reference'), name: opt(f, 'name'), kernel_ref: opt(f, 'kernel_ref') });
    stop.now();
  });
  build.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const f = new FormData(build);
    await streamOp(`build ${f.get('name')}`, '/v1/images/build', { name: f.get('name'), suite: opt(f, 'suite') });
    stop.now();
  });
  main.replaceChildren(h('div', { class: 'title' }, h('h1', {}, 'Images')), table, h('div', { class: 'grid' }, pull, build));
  const stop = poll(async () => {
    const list = await getJson('/v1/images');
    table.replaceChildren(
      h('thead', {}, h('tr', {}, ...['Name', 'Kernel', 'Kind', 'Size', 'Created', ''].map((c) => h('th', {}, c)))),
      h('tbody', {}, list.length ? list.map((img) => h('tr', { dataset: { image: img.name } },
        h('td', {}, img.name),
        h('td', {}, img.kernel),
        h('td', {}, img.managed ? 'managed' : 'registered'),
        h('td', { class: 'num' }, bytes(img.size_bytes)),
        h('td', {}, when(img.created_at)),
        h('td', {}, h('button', {
          type: 'button',
          class: 'danger',
          onclick: async () => {
            if (!(await confirmDialog(`Delete image ${img.name}?${img.managed ? ' Its files are removed.' : ''}`))) return;
            const op = startOp(`delete image ${img.name}`);
            try { await api('DELETE', `/v1/images/${enc(img.name)}`); op.done(); } catch (e) { op.fail(e.message); }
            stop.now();
          },
        }, 'delete'))))
        : h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No images.'))));
  }, 5000);
  return { stop };
}

function kernelsPage() {
  const table = h('table', { id: 'kernels' });
  const pull = h('form', { class: 'card inline' },
    h('h2', {}, 'Pull a kernel'),
    h('input', { name: 'name', required: true, placeholder: 'catalog name, e.g. generic-6.12' }),
    h('button', { type: 'submit', class: 'primary' }, 'Pull'));
  pull.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const f = new FormData(pull);
    pull.reset();
    await streamOp(`pull kernel ${f.get('name')}`, '/v1/kernels/pull', { name: f.get('name') });
    stop.now();
  });
  main.replaceChildren(h('div', { class: 'title' }, h('h1', {}, 'Kernels')), table, pull);
  const stop = poll(async () => {
    const list = await getJson('/v1/kernels');
    table.replaceChildren(
      h('thead', {}, h('tr', {}, ...['Name', 'Release', 'Kernel', 'Initrd', 'Created', ''].map((c) => h('th', {}, c)))),
      h('tbody', {}, list.length ? list.map((k) => h('tr', { dataset: { kernel: k.name } },
        h('td', {}, k.name),
        h('td', {}, k.release || '-'),
        h('td', { class: 'path' }, k.kernel),
        h('td', { class: 'path' }, k.initrd || '-'),
        h('td', {}, when(k.created_at)),
        h('td', {}, h('button', {
          type: 'button',
          class: 'danger',
          onclick: async () => {
            if (!(await confirmDialog(`Delete kernel ${k.name}?`))) return;
            const op = startOp(`delete kernel ${k.name}`);
            try { await api('DELETE', `/v1/kernels/${enc(k.name)}`); op.done(); } catch (e) { op.fail(e.message); }
            stop.now();
          },
        }, 'delete'))))
        : h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No kernels.'))));
  }, 5000);
  return { stop };
}

// ---- routing -------------------------------------------------------------

let page = null;
function route() {
  if (page) page.stop();
  const hash = location.hash || '#/';
  const m = hash.match(/^#\/vm\/(.+)$/);
  let nav = 'vms';
  if (m) page = vmDetail(decodeURIComponent(m[1]));
  else if (hash === '#/images') { page = imagesPage(); nav = 'images'; }
  else if (hash === '#/kernels') { page = kernelsPage(); nav = 'kernels'; }
  else page = vmsPage();
  for (const a of document.querySelectorAll('[data-nav]')) {
    a.classList.toggle('active', a.dataset.nav === nav);
  }
}

window.addEventListener('hashchange', route);
route();
getJson('/v1/info').then((i) => {
  document.getElementById('daemon').textContent = `bangerd ${i.build.version} · ${i.backend}`;
}).catch((e) => toast(e.message));
