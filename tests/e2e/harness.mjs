// The end-to-end harness: starts real gpustream processes (serve, provider agents) and the test
// upstream on loopback, each on a port it picks itself, and gives the tests small clients for the
// admin API and the user API. Every child is killed when its scenario ends, also on failure, and
// the tail of each child's stderr is printed when a scenario fails, so CI logs say why.
//
// Binaries come from the environment that ctest sets: GPUSTREAM_BIN and GPUSTREAM_TEST_UPSTREAM_BIN.

import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { constants as os_constants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { setTimeout as delay } from 'node:timers/promises';
import test from 'node:test';

/// The official OpenAI SDK, from tests/e2e/node_modules (installed by scripts/setup).
export const OpenAI = await import('openai').then((module) => module.default, (error) => {
  throw new Error(`the npm package 'openai' is not installed in tests/e2e: run ./scripts/setup (${error.message})`);
});

/// Longest wait for something that should happen soon (a process ready, a provider online, a job
/// recorded). Generous: CI machines have 2 cores and run two of these files at once.
export const deadline_ms = 20_000;
/// How often a condition is polled while waiting for it.
const poll_interval_ms = 20;
/// Lines of each child's output kept for the failure report.
const output_lines_max = 400;
/// Lines of each child's output printed when a scenario fails.
const output_lines_printed_max = 80;

const gpustream_bin = required_env('GPUSTREAM_BIN');
const upstream_bin = required_env('GPUSTREAM_TEST_UPSTREAM_BIN');

function required_env(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run these tests through ctest (it sets ${name} to the built binary)`);
  }
  return value;
}

// Every child of this process, so that none outlives it: at its exit, and when it is stopped by
// a signal (ctest's timeout, a cancelled CI job), which 'exit' does not see. A SIGKILL of this
// process still leaves them.
const all_children = new Set();
const kill_all_children = () => {
  for (const child of all_children) child.kill('SIGKILL');
};
process.on('exit', kill_all_children);
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(signal, () => {
    kill_all_children();
    process.exit(128 + os_constants.signals[signal]);
  });
}

/// Polls `condition` (sync or async) until it returns a truthy value, which is returned. Throws
/// naming `what` once `timeout_ms` has passed. An exception thrown by `condition` counts as "not
/// yet" and is reported if the deadline passes.
export async function wait_for(what, condition, { timeout_ms = deadline_ms, interval_ms = poll_interval_ms } = {}) {
  const start = performance.now();
  let last_error;
  for (;;) {
    try {
      const value = await condition();
      if (value) return value;
    } catch (error) {
      last_error = error;
    }
    if (performance.now() - start > timeout_ms) {
      const why = last_error ? ` (last error: ${last_error.message})` : '';
      throw new Error(`timed out after ${timeout_ms} ms waiting for ${what}${why}`);
    }
    await delay(interval_ms);
  }
}

/// A child process with its output kept line by line.
class child_process {
  constructor(name, command, args, env) {
    this.name = name;
    this.command_line = [command, ...args].join(' ');
    /// The last output_lines_max lines, oldest first: lines[i] is line number
    /// line_count - lines.length + i of all the lines printed.
    this.lines = [];
    /// Lines printed so far, also those no longer kept: the number the next line will have.
    this.line_count = 0;
    this.exited = false;
    this.exit_code = null;
    this.exit_signal = null;
    this.line_waiters = new Set();
    this.process = spawn(command, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    all_children.add(this.process);
    this.exit_promise = new Promise((resolve) => {
      // 'close', not 'exit': it comes once the output is read to its end too, so a line printed
      // just before the exit is there for wait_line and run().
      this.process.on('close', (code, signal) => {
        this.exited = true;
        this.exit_code = code;
        this.exit_signal = signal;
        all_children.delete(this.process);
        for (const waiter of this.line_waiters) waiter.check();
        resolve({ code, signal });
      });
      this.process.on('error', (error) => {
        this.keep('spawn', `cannot start ${command}: ${error.message}`);
        this.exited = true;
        all_children.delete(this.process);
        for (const waiter of this.line_waiters) waiter.check();
        resolve({ code: null, signal: null, error });
      });
    });
    this.read_lines(this.process.stdout, 'stdout');
    this.read_lines(this.process.stderr, 'stderr');
  }

  read_lines(stream, which) {
    let partial = '';
    stream.setEncoding('utf8');
    stream.on('data', (text) => {
      partial += text;
      let newline;
      while ((newline = partial.indexOf('\n')) >= 0) {
        this.keep(which, partial.slice(0, newline));
        partial = partial.slice(newline + 1);
      }
    });
    stream.on('end', () => {
      if (partial) this.keep(which, partial);
      partial = '';
    });
  }

  keep(which, line) {
    this.lines.push({ which, line });
    this.line_count += 1;
    if (this.lines.length > output_lines_max) this.lines.shift();
    for (const waiter of this.line_waiters) waiter.check();
  }

  /// Waits for an output line matching `pattern` (a RegExp) and returns its match, with the
  /// line's number as `line_index`; fails when the process exits first or the deadline passes.
  /// Lines from number `from_index` on count (numbers are absolute, as `line_count`, so they stay
  /// valid when old lines are dropped), also those seen before the call.
  wait_line(pattern, { timeout_ms = deadline_ms, from_index = 0 } = {}) {
    return new Promise((resolve, reject) => {
      const waiter = {
        check: () => {
          const first_kept = this.line_count - this.lines.length;
          for (let i = Math.max(from_index - first_kept, 0); i < this.lines.length; ++i) {
            const match = this.lines[i].line.match(pattern);
            if (match) {
              match.line_index = first_kept + i;
              return finish(() => resolve(match));
            }
          }
          if (this.exited) {
            finish(() => reject(new Error(`${this.name} exited (code ${this.exit_code}, signal ${this.exit_signal}) ` +
                                          `before printing a line matching ${pattern}`)));
          }
        },
      };
      const timer = setTimeout(() => finish(() => reject(new Error(
        `${this.name} printed no line matching ${pattern} within ${timeout_ms} ms`))), timeout_ms);
      const finish = (settle) => {
        clearTimeout(timer);
        this.line_waiters.delete(waiter);
        settle();
      };
      this.line_waiters.add(waiter);
      waiter.check();
    });
  }

  /// Lines of output (both streams) that match `pattern`.
  matching_lines(pattern) {
    return this.lines.filter((entry) => pattern.test(entry.line)).map((entry) => entry.line);
  }

  /// Sends `signal` and waits for the process to end; throws when it is still running after
  /// `timeout_ms` (it is killed at the scenario's end then).
  async stop(signal = 'SIGKILL', { timeout_ms = deadline_ms } = {}) {
    if (!this.exited) this.process.kill(signal);
    let timer;
    const overtime = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${this.name} still runs ${timeout_ms} ms after ${signal}`)), timeout_ms);
    });
    try {
      return await Promise.race([this.exit_promise, overtime]);
    } finally {
      clearTimeout(timer);
    }
  }

  report() {
    const shown = this.lines.slice(-output_lines_printed_max);
    const status = this.exited ? `exited code=${this.exit_code} signal=${this.exit_signal}` : 'running';
    const head = `----- ${this.name} (${status}): ${this.command_line}\n`;
    const skipped = this.line_count > shown.length ? `  … ${this.line_count - shown.length} earlier lines\n` : '';
    return head + skipped + shown.map((entry) => `  [${entry.which}] ${entry.line}`).join('\n');
  }
}

/// A small JSON-over-HTTP client for one base URL and bearer token.
export class http_client {
  constructor(base_url, token) {
    this.base_url = base_url;
    this.token = token;
  }

  /// The raw fetch Response.
  request(method, path, { body, headers = {}, signal, token = this.token } = {}) {
    const all_headers = { ...headers };
    if (token) all_headers.authorization = `Bearer ${token}`;
    let payload = body;
    if (body !== undefined && typeof body !== 'string' && !(body instanceof Uint8Array)) {
      payload = JSON.stringify(body);
      all_headers['content-type'] = 'application/json';
    }
    return fetch(this.base_url + path, { method, headers: all_headers, body: payload, signal, redirect: 'manual' });
  }

  /// The parsed JSON body of a 2xx answer; throws with the status and body otherwise.
  async json(method, path, options) {
    const response = await this.request(method, path, options);
    const text = await response.text();
    if (!response.ok) throw new Error(`${method} ${path} answered ${response.status}: ${text}`);
    return JSON.parse(text);
  }

  get(path, options) {
    return this.json('GET', path, options);
  }

  post(path, body, options) {
    return this.json('POST', path, { ...options, body });
  }
}

/// A running `gpustream serve`.
export class serve_process {
  constructor(child, port, data_dir, admin_token) {
    this.child = child;
    this.port = port;
    this.data_dir = data_dir;
    this.base_url = `http://127.0.0.1:${port}`;
    this.admin = new http_client(this.base_url, admin_token);
  }

  /// An OpenAI SDK client for `api_key` (no retries: the tests check the first answer).
  openai(api_key, options = {}) {
    return new OpenAI({ apiKey: api_key, baseURL: `${this.base_url}/v1`, maxRetries: 0, timeout: 60_000, ...options });
  }

  user_client(api_key) {
    return new http_client(this.base_url, api_key);
  }

  async create_user(tier, credit_micros = 0) {
    return this.admin.post('/admin/users', { tier, credit_micros });
  }

  async create_provider(name) {
    return this.admin.post('/admin/providers', { name });
  }

  /// Balances by account name, and the ledger's total (zero when the money adds up).
  async accounts() {
    const answer = await this.admin.get('/admin/accounts?limit=1000');
    if (answer.has_more) throw new Error('more than 1000 ledger accounts: raise the limit in the harness');
    const balances = {};
    for (const entry of answer.data) balances[entry.account] = entry.balance_micros;
    return { balances, total_micros: answer.total_micros };
  }

  async jobs(state) {
    const query = state ? `?state=${state}&limit=1000` : '?limit=1000';
    return (await this.admin.get(`/admin/jobs${query}`)).data;
  }

  /// Waits until every job of `job_ids` is listed in `state` with `ready(job)` true, and returns
  /// them in that order. The admin listing is a projection of the log: it may trail the client's
  /// answer by a moment, and a job's money trails its end (billed_jobs waits for it).
  async wait_jobs(job_ids, state, ready = () => true) {
    return wait_for(`jobs ${job_ids.join(', ')} in GET /admin/jobs?state=${state}`, async () => {
      const listed = await this.jobs(state);
      const found = job_ids.map((id) => listed.find((job) => job.id === id));
      return found.every((job) => job && ready(job)) ? found : null;
    });
  }

  /// Completed jobs with their money recorded: for jobs that cost something (a priced provider),
  /// and, for free-tier ones, whose ad was paid for.
  async billed_jobs(job_ids) {
    return this.wait_jobs(job_ids, 'completed', (job) => job.gross_micros > 0 && (job.premium || job.ad_micros > 0));
  }

  async provider_entry(provider_id) {
    const answer = await this.admin.get('/admin/providers?limit=1000');
    return answer.data.find((provider) => provider.id === provider_id);
  }

  /// Waits until `model` is listed in GET /v1/models with at least `providers` providers online
  /// (the user-visible sign that an agent is online) and returns the listing.
  async wait_model(api_key, model, providers = 1) {
    const client = this.user_client(api_key);
    return wait_for(`model ${model} listed with ${providers} provider(s) online`, async () => {
      const listing = await client.get('/v1/models');
      const entry = listing.data.find((m) => m.id === model);
      return entry && entry.x_gpustream.providers_online >= providers ? entry : null;
    });
  }

  /// Waits until the admin API shows `provider_id` online.
  async wait_provider_online(provider_id) {
    return wait_for(`provider ${provider_id} online`, async () => {
      const entry = await this.provider_entry(provider_id);
      return entry && entry.status === 'online' ? entry : null;
    });
  }

  async wait_provider_offline(provider_id) {
    return wait_for(`provider ${provider_id} offline`, async () => {
      const entry = await this.provider_entry(provider_id);
      return entry && entry.status !== 'online' ? entry : null;
    });
  }
}

/// A running gpustream_test_upstream.
export class upstream_process {
  constructor(child, port) {
    this.child = child;
    this.port = port;
    this.base_url = `http://127.0.0.1:${port}/v1`;
  }

  async stats() {
    const response = await fetch(`http://127.0.0.1:${this.port}/stats`);
    if (!response.ok) throw new Error(`GET /stats answered ${response.status}`);
    return response.json();
  }
}

/// The expected answer of the test upstream: token i is "tok<i> ".
export function upstream_text(tokens, first = 0) {
  let text = '';
  for (let i = first; i < first + tokens; ++i) text += `tok${i} `;
  return text;
}

/// The job id inside a response id ("chatcmpl-<job>" or "cmpl-<job>").
export function job_id_of(response_id) {
  return response_id.replace(/^(chatcmpl|cmpl)-/, '');
}

/// What a job costs, as domain/pricing.hpp defines it: the exact gross price rounded up once.
export function gross_micros(prompt_tokens, completion_tokens, model_offer, multiplier_percent = 100) {
  const numerator = (BigInt(prompt_tokens) * BigInt(model_offer.input_price_micros_per_mtok) +
                     BigInt(completion_tokens) * BigInt(model_offer.output_price_micros_per_mtok)) *
                    BigInt(multiplier_percent);
  const denominator = 1_000_000n * 100n;
  return Number((numerator + denominator - 1n) / denominator);
}

/// The platform's fee on a gross price (rounded down), at the default 10%.
export function platform_fee_micros(gross, fee_bps = 1000) {
  return Math.floor((gross * fee_bps) / 10_000);
}

/// The difference of two account snapshots: account -> after - before, for accounts that moved.
export function balance_changes(before, after) {
  const changes = {};
  for (const account of new Set([...Object.keys(before.balances), ...Object.keys(after.balances)])) {
    const change = (after.balances[account] ?? 0) - (before.balances[account] ?? 0);
    if (change !== 0) changes[account] = change;
  }
  return changes;
}

/// Reads a streamed answer as raw SSE with fetch: every `data:` payload in order (the last is
/// "[DONE]" when the stream ended properly), parsed as JSON where it is JSON.
export async function read_sse(response) {
  const text = await response.text();
  const events = [];
  for (const block of text.split(/\r?\n\r?\n/)) {
    const data = block.split(/\r?\n/).filter((line) => line.startsWith('data:')).map((line) => line.slice(5).trimStart());
    if (data.length === 0) continue;
    const payload = data.join('\n');
    events.push(payload === '[DONE]' ? payload : JSON.parse(payload));
  }
  return events;
}

/// The world of one scenario: its processes, temporary folders and admin token.
export class scenario_world {
  constructor(name) {
    this.name = name;
    this.children = [];
    this.temp_dirs = [];
    this.admin_token = `admin-${randomBytes(12).toString('hex')}`;
    /// Set when the cleanup begins: a scenario body still running after its overtime may start
    /// nothing more, so no process or folder outlives the cleanup.
    this.closed = false;
  }

  refuse_when_closed(what) {
    if (this.closed) throw new Error(`scenario "${this.name}" has ended: ${what} refused`);
  }

  async temp_dir(label) {
    this.refuse_when_closed(`a temporary folder (${label})`);
    const dir = await mkdtemp(join(tmpdir(), `gpustream-e2e-${label}-`));
    this.temp_dirs.push(dir);
    if (this.closed) {
      // Made while the cleanup ran: removed here, as the cleanup may have passed it by.
      await rm(dir, { recursive: true, force: true });
      this.refuse_when_closed(`a temporary folder (${label})`);
    }
    return dir;
  }

  spawn(name, command, args, env = {}) {
    this.refuse_when_closed(`starting ${name}`);
    const child = new child_process(name, command, args, env);
    this.children.push(child);
    return child;
  }

  /// Starts `gpustream serve` on a port of its choosing; `data_dir` reuses a store (a restart),
  /// `http` a fixed address. Durability is the product's default, sync.
  async serve({ args = [], data_dir, http = '127.0.0.1:0', durability = 'sync', name = 'serve' } = {}) {
    const dir = data_dir ?? await this.temp_dir('data');
    const start = () => this.spawn(name, gpustream_bin,
      ['serve', '--data', dir, '--http', http, '--durability', durability, ...args],
      { GPUSTREAM_ADMIN_TOKEN: this.admin_token });
    // A port given again (a restart) may be held for a moment by another process's connection
    // from it (ports from :0 are ephemeral ones, also used for outgoing connections): tried again
    // until deadline_ms.
    const started_at = performance.now();
    for (;;) {
      const child = start();
      try {
        const match = await child.wait_line(/listening http=127\.0\.0\.1:(\d+)/);
        return new serve_process(child, Number(match[1]), dir, this.admin_token);
      } catch (error) {
        if (!child.exited) throw error;  // no line in time: it may still run, and the world kills it
        const in_use = child.lines.some((entry) => /already in use/i.test(entry.line));
        if (!in_use || http.endsWith(':0') || performance.now() - started_at > deadline_ms) throw error;
        console.log(`${name}: ${http} is in use; trying again`);
        await delay(poll_interval_ms);
      }
    }
  }

  /// Starts gpustream_test_upstream with its command-line `options` ({tokens: 12} → --tokens 12).
  async upstream(options = {}, name = 'upstream') {
    const args = ['--listen', '127.0.0.1:0'];
    for (const [key, value] of Object.entries(options)) args.push(`--${key.replaceAll('_', '-')}`, String(value));
    const child = this.spawn(name, upstream_bin, args);
    const match = await child.wait_line(/^listening 127\.0\.0\.1:(\d+)$/);
    return new upstream_process(child, Number(match[1]));
  }

  /// Starts a `gpustream provider` agent for the provider `token` in front of `upstream`. Its
  /// concurrency probe is off unless `probe` is set: the probe's requests would blur the upstream's
  /// counts and, against a slow or failing upstream, delay the agent's start by seconds.
  provider(server, token, upstream, { name = 'provider', args = [], port = server.port, probe = false } = {}) {
    return this.spawn(name, gpustream_bin,
      ['provider', '--coordinator', `ws://127.0.0.1:${port}`, '--backend', `openai=${upstream.base_url}`,
       '--name', name, ...(probe ? [] : ['--no-probe']), ...args],
      { GPUSTREAM_PROVIDER_TOKEN: token });
  }

  /// Runs a gpustream subcommand to its end; resolves to {code, signal, output, stdout}: output
  /// is every line (logs go to stderr), stdout the command's own output.
  async run(args, name = 'gpustream') {
    const child = this.spawn(name, gpustream_bin, args);
    const { code, signal } = await child.exit_promise;
    return {
      code, signal,
      output: child.lines.map((entry) => entry.line).join('\n'),
      stdout: child.lines.filter((entry) => entry.which === 'stdout').map((entry) => entry.line).join('\n'),
    };
  }

  report() {
    return this.children.map((child) => child.report()).join('\n');
  }

  async cleanup(keep_files) {
    this.closed = true;
    await Promise.all(this.children.map((child) => child.stop('SIGKILL')));
    if (keep_files) return;
    await Promise.all(this.temp_dirs.map((dir) => rm(dir, { recursive: true, force: true })));
  }
}

/// Longest run of one scenario. Below ctest's 300 s for a whole file, and enforced here rather
/// than by node:test's own timeout, so that a scenario that hangs still reports its processes.
const scenario_ms_max = 150_000;

/// A node:test test running `body(world)`; every child is killed at the end, and on failure the
/// children's output is printed and their temporary folders are kept.
export function scenario(name, body, options = {}) {
  return test(name, options, async (t) => {
    const world = new scenario_world(name);
    let failed = true;
    let timer;
    const overtime = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`the scenario took longer than ${scenario_ms_max} ms`)), scenario_ms_max);
    });
    try {
      await Promise.race([body(world, t), overtime]);
      failed = false;
    } finally {
      clearTimeout(timer);
      if (failed) {
        console.error(`\n===== scenario "${name}" failed; output of its processes:\n${world.report()}`);
        if (world.temp_dirs.length > 0) console.error(`===== kept: ${world.temp_dirs.join(' ')}`);
      }
      await world.cleanup(failed);
    }
  });
}

/// The common setup: a server, one upstream and one provider agent online for `model`.
export async function one_provider_world(world, {
  serve_args = [], upstream_options = {}, model = 'e2e-model', price_per_mtok = 2_000_000, provider_args = [],
  probe = false,
} = {}) {
  const server = await world.serve({ args: serve_args });
  const upstream = await world.upstream({ models: model, ...upstream_options });
  const provider = await server.create_provider('e2e-provider');
  const agent = world.provider(server, provider.token, upstream,
    { name: 'provider', probe, args: ['--price-per-mtok', String(price_per_mtok), ...provider_args] });
  const watcher = await server.create_user('premium', 0);
  await server.wait_model(watcher.api_key, model);
  return { server, upstream, provider, agent, model };
}
