//! The serving engine: one frozen base model, a registry of named adapters, a queue of requests
//! and one scheduler thread that runs them with continuous batching.
//!
//! Requests for any mix of adapters share every decode step. Adapters act on prompt positions
//! (the default, prompt-only mode), so a request's adapter matters only while its prompt is
//! prefilled: requests that arrive together and ask for the same adapters are prefilled as one
//! batch with those adapters, then join the running [`DecodeBatch`], where every step is the plain
//! base model for everyone. The HTTP layer (in the CLI crate) only translates requests and
//! events; everything about scheduling lives here.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::adapter::{Adapter, AdapterSet, PerExample};
use crate::generate::{DecodeBatch, Event, Generation, GenerationConfig, Request};
use crate::load::LanguageModel;
use crate::model::NoHooks;
use crate::{Error, Result};

mod prefix_cache;
mod stats;

pub use prefix_cache::PrefixCache;
pub use stats::{EngineStats, Histogram, HistogramSnapshot};

/// What a client asks for: prompt ids, settings, and the adapters to apply (by name; none for
/// the base model).
#[derive(Debug, Clone)]
pub struct Submission {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub cfg: GenerationConfig,
    /// Registered adapters to compose, in order.
    pub adapters: Vec<String>,
}

/// What a client receives for its request, in order: text as it becomes final, then one `Done`
/// or one `Failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// New final text.
    Text(String),
    /// The request finished.
    Done(Generation),
    /// The request could not run.
    Failed(Failure),
}

/// Why a request could not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong, in words.
    pub message: String,
    /// The request itself was at fault (adapters that edit the same positions, …), not the
    /// engine or the model.
    pub bad_request: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Where a request's updates go: a channel here, an HTTP response in the server.
pub trait UpdateSink: Send {
    /// Delivers `update`; `false` when the client has gone, which cancels the request.
    fn deliver(&mut self, update: Update) -> bool;
    /// Whether the client has gone; checked before every step, so that a client that leaves
    /// while its request waits, or between pieces of text, is noticed at the next step.
    fn is_closed(&self) -> bool {
        false
    }
}

impl UpdateSink for Sender<Update> {
    fn deliver(&mut self, update: Update) -> bool {
        self.send(update).is_ok()
    }
}

/// Why a submission was refused before it was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No adapter of that name is registered (or it is being unloaded).
    #[error("unknown adapter `{0}`")]
    UnknownAdapter(String),
    /// The prompt alone fills the model's context.
    #[error(
        "a prompt of {tokens} tokens leaves no room in the model's context of {context} positions"
    )]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// The model's context.
        context: usize,
    },
    /// `max_queue` requests are already waiting.
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    /// The engine no longer runs.
    #[error("the engine has stopped")]
    Stopped,
}

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    /// Sequences decoding at once; more wait in the queue.
    pub max_running: usize,
    /// Requests waiting for a decode slot; a submission beyond this is refused.
    pub max_queue: usize,
    /// Bytes of prompt-prefix keys and values kept for reuse by later requests that start
    /// with the same tokens (see [`PrefixCache`]); 0 turns the reuse off.
    pub prefix_cache_bytes: usize,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            max_running: 32,
            max_queue: 256,
            prefix_cache_bytes: 1 << 30,
        }
    }
}

enum Command {
    Submit(Box<Submission>, Box<dyn UpdateSink>),
    Load(String, Box<Adapter>, Sender<Result<()>>),
    Unload(String, Sender<Result<()>>),
    Shutdown,
}

/// A running engine; dropping it (or [`Engine::shutdown`]) lets running requests finish first.
pub struct Engine {
    tx: Sender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<EngineStats>,
    /// Names a submission may ask for (an adapter being unloaded is gone from here at once).
    names: Arc<Mutex<Vec<String>>>,
    limits: EngineLimits,
    context_limit: Option<usize>,
}

impl Engine {
    /// Starts the scheduler thread on `model` with `adapters` registered under their names.
    pub fn start(
        model: Arc<LanguageModel>,
        adapters: Vec<(String, Adapter)>,
        limits: EngineLimits,
    ) -> Result<Self> {
        let mut registry = HashMap::new();
        let mut names = Vec::new();
        for (name, adapter) in adapters {
            check_servable(&name, &adapter)?;
            if registry.insert(name.clone(), adapter).is_some() {
                return Err(Error::InvalidArgument(format!(
                    "adapter name `{name}` given twice"
                )));
            }
            names.push(name);
        }
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let names = Arc::new(Mutex::new(names));
        // The context the model was trained for, as vLLM's `max_model_len`: rotary models could
        // run past it, but their answers there are not worth serving.
        let context_limit = model
            .decoder
            .context_limit()
            .or(Some(model.decoder.config().max_position_embeddings))
            .filter(|&n| n > 0);
        let scheduler = Scheduler {
            unloading: Vec::new(),
            model,
            registry,
            limits,
            stats: Arc::clone(&stats),
            waiting: Vec::new(),
            clients: BTreeMap::new(),
            next_tag: 0,
            prefixes: PrefixCache::new(limits.prefix_cache_bytes),
        };
        let thread = std::thread::Builder::new()
            .name("reft-scheduler".into())
            .spawn(move || scheduler.run(rx))
            .map_err(|e| Error::InvalidArgument(format!("cannot start the scheduler: {e}")))?;
        Ok(Self {
            tx,
            thread: Mutex::new(Some(thread)),
            stats,
            names,
            limits,
            context_limit,
        })
    }

    /// The adapters' names, in the order they were registered or loaded.
    pub fn adapter_names(&self) -> Vec<String> {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Registers `adapter` as `name` while the engine runs; an existing name is refused.
    pub fn load_adapter(&self, name: &str, adapter: Adapter) -> Result<()> {
        check_servable(name, &adapter)?;
        let (tx, rx) = mpsc::channel();
        self.command(Command::Load(name.to_string(), Box::new(adapter), tx))?;
        let result = rx.recv().unwrap_or_else(|_| Err(stopped()));
        if result.is_ok() {
            self.lock_names().push(name.to_string());
        }
        result
    }

    /// Removes adapter `name`: new requests for it are refused at once; it leaves the registry
    /// (and this call returns) once no queued request still needs it. Requests already decoding
    /// do not: an adapter acts only while a prompt is prefilled.
    pub fn unload_adapter(&self, name: &str) -> Result<()> {
        {
            let mut names = self.lock_names();
            let Some(at) = names.iter().position(|n| n == name) else {
                return Err(Refusal::UnknownAdapter(name.to_string()).into());
            };
            names.remove(at);
        }
        let (tx, rx) = mpsc::channel();
        self.command(Command::Unload(name.to_string(), tx))?;
        rx.recv().unwrap_or_else(|_| Err(stopped()))
    }

    fn lock_names(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn command(&self, c: Command) -> Result<()> {
        self.tx.send(c).map_err(|_| stopped())
    }

    /// The engine's counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Queues a request; its updates arrive on the returned receiver. Dropping the receiver
    /// cancels the request: the sequence leaves the batch at the first step whose text cannot
    /// be delivered. Refused ([`Refusal`]) when an adapter is unknown, the prompt does not fit
    /// the model's context, or the queue is full.
    pub fn submit(&self, s: Submission) -> Result<Receiver<Update>> {
        let (tx, rx) = mpsc::channel();
        self.submit_to(s, Box::new(tx))?;
        Ok(rx)
    }

    /// Queues a request whose updates go to `sink`.
    pub fn submit_to(&self, s: Submission, sink: Box<dyn UpdateSink>) -> Result<()> {
        {
            let names = self.lock_names();
            if let Some(unknown) = s.adapters.iter().find(|a| !names.contains(a)) {
                return Err(Refusal::UnknownAdapter(unknown.clone()).into());
            }
        }
        if let Some(context) = self.context_limit {
            if s.prompt.len() >= context {
                return Err(Refusal::PromptTooLong {
                    tokens: s.prompt.len(),
                    context,
                }
                .into());
            }
        }
        // Requests about to take a free decode slot do not count against the queue, so that a
        // burst that fits `max_running` is never refused.
        let free = self
            .limits
            .max_running
            .saturating_sub(self.stats.running.load(Ordering::SeqCst));
        if self.stats.queued.load(Ordering::SeqCst) >= self.limits.max_queue + free {
            return Err(Refusal::QueueFull(self.limits.max_queue).into());
        }
        let key = s.adapters.join("+");
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.command(Command::Submit(Box::new(s), sink)) {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(e);
        }
        *self
            .stats
            .requests_by_adapter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default() += 1;
        Ok(())
    }

    /// The model's context in positions, where it has one.
    pub fn context_limit(&self) -> Option<usize> {
        self.context_limit
    }

    /// Stops taking requests, lets the running and queued ones finish, and joins the thread.
    /// Later submissions are refused ([`Refusal::Stopped`]).
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A request's client, with the times its latencies are measured from.
struct Client {
    sink: Box<dyn UpdateSink>,
    submitted: Instant,
    last_text: Option<Instant>,
}

impl Client {
    /// Delivers text, recording time to first token or the gap since the last text.
    fn text(&mut self, text: String, stats: &EngineStats) -> bool {
        let now = Instant::now();
        match self.last_text {
            None => stats
                .time_to_first_token
                .observe((now - self.submitted).as_secs_f64()),
            Some(t) => stats.inter_token_latency.observe((now - t).as_secs_f64()),
        }
        self.last_text = Some(now);
        self.sink.deliver(Update::Text(text))
    }
}

/// The scheduler thread's state.
struct Scheduler {
    model: Arc<LanguageModel>,
    registry: HashMap<String, Adapter>,
    limits: EngineLimits,
    stats: Arc<EngineStats>,
    waiting: Vec<(u64, Submission)>,
    clients: BTreeMap<u64, Client>,
    next_tag: u64,
    /// Adapters to remove once no waiting request needs them, with whom to tell.
    unloading: Vec<(String, Sender<Result<()>>)>,
    /// Prompt prefixes computed so far, for requests that start with the same tokens.
    prefixes: PrefixCache,
}

impl Scheduler {
    fn run(mut self, rx: Receiver<Command>) {
        // This thread runs the model: flush denormals to zero here too (SPEC §8).
        crate::cpu::tune_cpu_runtime();
        let lm = Arc::clone(&self.model);
        let mut batch = DecodeBatch::new(&lm.decoder, &lm.tokenizer);
        let mut closing = false;
        loop {
            // Block only when there is nothing to do.
            let idle = batch.is_empty() && self.waiting.is_empty();
            if idle && closing {
                return;
            }
            let first = if idle {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            } else {
                match rx.recv_timeout(Duration::ZERO) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        closing = true;
                        None
                    }
                }
            };
            let mut commands: Vec<Command> = first.into_iter().collect();
            commands.extend(rx.try_iter());
            for c in commands {
                match c {
                    Command::Submit(s, sink) => {
                        let tag = self.next_tag;
                        self.next_tag += 1;
                        let client = Client {
                            sink,
                            submitted: Instant::now(),
                            last_text: None,
                        };
                        self.clients.insert(tag, client);
                        self.waiting.push((tag, *s));
                    }
                    Command::Load(name, adapter, reply) => {
                        let result = match self.registry.entry(name) {
                            std::collections::hash_map::Entry::Occupied(e) => {
                                Err(Error::InvalidArgument(format!(
                                    "an adapter named `{}` is already loaded",
                                    e.key()
                                )))
                            }
                            std::collections::hash_map::Entry::Vacant(e) => {
                                e.insert(*adapter);
                                Ok(())
                            }
                        };
                        let _ = reply.send(result);
                    }
                    Command::Unload(name, reply) => self.unloading.push((name, reply)),
                    Command::Shutdown => closing = true,
                }
            }
            self.drop_closed(&mut batch);
            self.admit(&mut batch);
            self.finish_unloads();
            if batch.is_empty() {
                continue;
            }
            self.step(&mut batch);
        }
    }

    /// Prefills waiting requests (up to `max_running` in the batch), one prefill per set of
    /// adapters, and merges them into the running batch.
    fn admit(&mut self, batch: &mut DecodeBatch) {
        let room = self.limits.max_running.saturating_sub(batch.len());
        if room == 0 || self.waiting.is_empty() {
            return;
        }
        let take = room.min(self.waiting.len());
        let admitted: Vec<(u64, Submission)> = self.waiting.drain(..take).collect();
        self.stats
            .queued
            .fetch_sub(admitted.len(), Ordering::SeqCst);
        let mut groups: BTreeMap<Vec<String>, Vec<(u64, Submission)>> = BTreeMap::new();
        for (tag, s) in admitted {
            groups.entry(s.adapters.clone()).or_default().push((tag, s));
        }
        for round in rounds(groups.into_iter().collect()) {
            // One prefill for the round; if it fails, one per group, so that only the group
            // at fault (adapters that clash, say) hears of it.
            match self.prefill(&round) {
                Ok(joining) => self.join(batch, &round, joining),
                Err(_) if round.len() > 1 => {
                    for group in round {
                        let one = [group];
                        match self.prefill(&one) {
                            Ok(joining) => self.join(batch, &one, joining),
                            Err(e) => self.fail_group(&one[0], e),
                        }
                    }
                }
                Err(e) => self.fail_group(&round[0], e),
            }
        }
        self.stats.running.store(batch.len(), Ordering::SeqCst);
    }

    /// Merges prefilled `joining` (the requests of `groups`) into the running batch.
    fn join(&mut self, batch: &mut DecodeBatch, groups: &[Group], joining: DecodeBatch) {
        let tags: Vec<u64> = groups
            .iter()
            .flat_map(|(_, g)| g.iter().map(|(t, _)| *t))
            .collect();
        let prompt_tokens: usize = groups
            .iter()
            .flat_map(|(_, g)| g.iter().map(|(_, s)| s.prompt.len()))
            .sum();
        self.stats
            .prompt_tokens
            .fetch_add(prompt_tokens, Ordering::SeqCst);
        if let Err(e) = batch.merge(joining) {
            self.fail(&tags, &e);
        }
    }

    fn fail_group(&mut self, (names, group): &Group, e: Error) {
        let tags: Vec<u64> = group.iter().map(|(t, _)| *t).collect();
        let e = match names.len() {
            0 | 1 => e,
            _ => Error::InvalidArgument(format!("adapters {}: {e}", names.join(" + "))),
        };
        self.fail(&tags, &e)
    }

    /// One prefill of `groups`' requests, each group's adapters (taken out of the registry for
    /// the pass and put back after) editing only its own requests.
    fn prefill(&mut self, groups: &[Group]) -> Result<DecodeBatch> {
        let lm = Arc::clone(&self.model);
        let reusable = self.reusable_lengths(groups);
        let requests: Vec<Request> = groups
            .iter()
            .flat_map(|(_, g)| g.iter())
            .map(|(tag, s)| Request {
                tag: *tag,
                prompt: s.prompt.clone(),
                cfg: s.cfg.clone(),
            })
            .collect();
        let mut hooks = PerExample { groups: Vec::new() };
        let mut taken: Vec<&String> = Vec::new();
        let mut missing = None;
        let mut start = 0;
        for (names, group) in groups {
            let mut keep = vec![false; requests.len()];
            keep[start..start + group.len()].fill(true);
            start += group.len();
            if names.is_empty() {
                continue;
            }
            let mut set = AdapterSet {
                adapters: Vec::with_capacity(names.len()),
            };
            for n in names {
                match self.registry.remove(n) {
                    Some(a) => {
                        set.adapters.push(a);
                        taken.push(n);
                    }
                    None => missing = Some(n.clone()),
                }
            }
            hooks.groups.push((set, keep));
        }
        let prompts: Vec<Vec<u32>> = requests.iter().map(|r| r.prompt.clone()).collect();
        let reused = self.cached_prefixes(&prompts, &reusable);
        let prefill = |hooks: &mut dyn crate::model::Hooks| {
            DecodeBatch::prefill_reusing(&lm.decoder, &lm.tokenizer, requests, reused, hooks)
        };
        let out = match missing {
            // The same adapter twice in one request, or one not registered.
            Some(n) => Err(Error::InvalidArgument(format!(
                "adapter `{n}` is unknown or named twice in one request"
            ))),
            None if hooks.groups.is_empty() => prefill(&mut NoHooks),
            None => prefill(&mut hooks),
        };
        let adapters = hooks.groups.into_iter().flat_map(|(set, _)| set.adapters);
        for (n, a) in taken.into_iter().zip(adapters) {
            self.registry.insert(n.clone(), a);
        }
        if let Ok(joining) = &out {
            self.keep_prefixes(joining, &prompts, &reusable);
        }
        out
    }

    /// Per request of `groups` (in order), how many of its prompt's first positions hold the
    /// base model's own keys and values: those before the first position its adapters edit.
    fn reusable_lengths(&self, groups: &[Group]) -> Vec<usize> {
        let mut lens = Vec::new();
        for (names, group) in groups {
            for (_, s) in group {
                let n = s.prompt.len();
                let first = names
                    .iter()
                    .filter_map(|name| self.registry.get(name))
                    .map(|a| a.first_edited(n).map(|f| f.unwrap_or(n)))
                    .try_fold(n, |m, f| f.map(|f| m.min(f)));
                // An adapter whose positions cannot be resolved fails in the prefill itself.
                lens.push(first.unwrap_or(0));
            }
        }
        lens
    }

    /// The longest cached prefix each prompt may reuse (leaving one token to run).
    fn cached_prefixes(
        &mut self,
        prompts: &[Vec<u32>],
        reusable: &[usize],
    ) -> Vec<Option<crate::model::PrefixKv>> {
        let mut reused = Vec::with_capacity(prompts.len());
        for (p, &r) in prompts.iter().zip(reusable) {
            let max = r.min(p.len().saturating_sub(1));
            // A lookup that fails (it cannot, short of memory) only costs the reuse.
            let hit = self.prefixes.lookup(p, max).ok().flatten();
            if let Some(h) = &hit {
                self.stats
                    .prompt_tokens_cached
                    .fetch_add(h.len, Ordering::SeqCst);
            }
            reused.push(hit);
        }
        reused
    }

    /// Caches the base-model part of each just-prefilled prompt that is not cached yet.
    fn keep_prefixes(&mut self, joining: &DecodeBatch, prompts: &[Vec<u32>], reusable: &[usize]) {
        for (row, (p, &r)) in prompts.iter().zip(reusable).enumerate() {
            let prefix = &p[..r.min(p.len())];
            if !self.prefixes.would_add(prefix) {
                continue;
            }
            if let Ok(kv) = joining.prompt_kv(row, prefix.len()) {
                let _ = self.prefixes.insert(prefix, &kv);
            }
        }
        self.stats
            .prefix_cache_bytes
            .store(self.prefixes.used_bytes(), Ordering::SeqCst);
    }

    /// One decode step, routing events to their clients; clients that went away are cancelled.
    /// Finished requests hear of it after the counters are updated, so a client that has its
    /// answer sees its sequence gone from `running`.
    fn step(&mut self, batch: &mut DecodeBatch) {
        let lm = Arc::clone(&self.model);
        let mut gone = Vec::new();
        let mut finished = Vec::new();
        let (clients, stats) = (&mut self.clients, &self.stats);
        let result = batch.step(&lm.decoder, &lm.tokenizer, None, &mut |e| match e {
            Event::Text { tag, text } => {
                if let Some(c) = clients.get_mut(&tag) {
                    if !c.text(text, stats) {
                        gone.push(tag);
                    }
                }
            }
            Event::Done { tag, generation } => finished.push((tag, generation)),
        });
        if let Err(e) = result {
            let tags = batch.tags();
            let _ = batch.cancel(&tags);
            self.fail(&tags, &e);
        }
        self.cancel(batch, &gone);
        self.stats.running.store(batch.len(), Ordering::SeqCst);
        for (tag, generation) in finished {
            self.stats
                .generated_tokens
                .fetch_add(generation.ids.len(), Ordering::SeqCst);
            if let Some(mut c) = self.clients.remove(&tag) {
                c.sink.deliver(Update::Done(generation));
            }
        }
    }

    /// Removes the adapters being unloaded that no waiting request still asks for.
    fn finish_unloads(&mut self) {
        let (ready, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unloading)
            .into_iter()
            .partition(|(name, _)| !self.waiting.iter().any(|(_, s)| s.adapters.contains(name)));
        self.unloading = still;
        for (name, reply) in ready {
            self.registry.remove(&name);
            let _ = reply.send(Ok(()));
        }
    }

    /// Cancels the requests whose clients have gone, waiting or decoding.
    fn drop_closed(&mut self, batch: &mut DecodeBatch) {
        let closed: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| c.sink.is_closed())
            .map(|(t, _)| *t)
            .collect();
        self.cancel(batch, &closed);
    }

    /// Removes `tags` from the queue and the batch and forgets their clients.
    fn cancel(&mut self, batch: &mut DecodeBatch, tags: &[u64]) {
        if tags.is_empty() {
            return;
        }
        let before = self.waiting.len();
        self.waiting.retain(|(t, _)| !tags.contains(t));
        self.stats
            .queued
            .fetch_sub(before - self.waiting.len(), Ordering::SeqCst);
        let _ = batch.cancel(tags);
        for t in tags {
            if self.clients.remove(t).is_some() {
                self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.stats.running.store(batch.len(), Ordering::SeqCst);
    }

    fn fail(&mut self, tags: &[u64], why: &Error) {
        let failure = Failure {
            message: why.to_string(),
            bad_request: matches!(why, Error::InvalidArgument(_) | Error::Refused(_)),
        };
        for t in tags {
            if let Some(mut c) = self.clients.remove(t) {
                c.sink.deliver(Update::Failed(failure.clone()));
            }
        }
    }
}

/// Requests that ask for the same adapters, with those adapters' names.
type Group = (Vec<String>, Vec<(u64, Submission)>);

/// Splits groups into rounds that share one prefill: no adapter in two groups of a round (an
/// adapter can edit only one set of examples per pass).
fn rounds(groups: Vec<Group>) -> Vec<Vec<Group>> {
    let mut rounds: Vec<Vec<Group>> = Vec::new();
    for g in groups {
        let fits = |r: &Vec<Group>| {
            !r.iter()
                .any(|(names, _)| names.iter().any(|n| g.0.contains(n)))
        };
        match rounds.iter_mut().find(|r| fits(r)) {
            Some(r) => r.push(g),
            None => rounds.push(vec![g]),
        }
    }
    rounds
}

/// Refuses adapters the engine cannot batch: those that edit generated tokens too.
fn check_servable(name: &str, adapter: &Adapter) -> Result<()> {
    if adapter.every_token() {
        return Err(Error::InvalidArgument(format!(
            "adapter `{name}` edits every generated token; the engine serves prompt-only \
             adapters, whose requests can share decode steps"
        )));
    }
    Ok(())
}

fn stopped() -> Error {
    Refusal::Stopped.into()
}
