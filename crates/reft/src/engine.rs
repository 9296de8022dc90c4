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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::adapter::{Adapter, AdapterSet};
use crate::generate::{DecodeBatch, Event, Generation, GenerationConfig, Request};
use crate::load::LanguageModel;
use crate::model::NoHooks;
use crate::{Error, Result};

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
    /// The request could not run (an adapter clash, a bad prompt, a model error).
    Failed(String),
}

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    /// Sequences decoding at once; more wait in the queue.
    pub max_running: usize,
    /// Requests waiting; a submission beyond this is refused.
    pub max_queue: usize,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            max_running: 32,
            max_queue: 256,
        }
    }
}

/// Counters the engine keeps for metrics and health.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests waiting to be prefilled.
    pub queued: AtomicUsize,
    /// Sequences decoding.
    pub running: AtomicUsize,
    /// Prompt tokens prefilled so far.
    pub prompt_tokens: AtomicUsize,
    /// Tokens generated so far.
    pub generated_tokens: AtomicUsize,
    /// Requests accepted, by the adapters they asked for (`+`-joined; empty for the base).
    pub requests_by_adapter: Mutex<BTreeMap<String, usize>>,
}

enum Command {
    Submit(Box<Submission>, Sender<Update>),
    Load(String, Box<Adapter>, Sender<Result<()>>),
    Unload(String, Sender<Result<()>>),
    Shutdown,
}

/// A running engine; dropping it (or [`Engine::shutdown`]) lets running requests finish first.
pub struct Engine {
    tx: Sender<Command>,
    thread: Option<JoinHandle<()>>,
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
        let context_limit = model.decoder.context_limit();
        let scheduler = Scheduler {
            unloading: Vec::new(),
            model,
            registry,
            limits,
            stats: Arc::clone(&stats),
            waiting: Vec::new(),
            clients: BTreeMap::new(),
            next_tag: 0,
        };
        let thread = std::thread::Builder::new()
            .name("reft-scheduler".into())
            .spawn(move || scheduler.run(rx))
            .map_err(|e| Error::InvalidArgument(format!("cannot start the scheduler: {e}")))?;
        Ok(Self {
            tx,
            thread: Some(thread),
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
                return Err(Error::InvalidArgument(format!("unknown adapter `{name}`")));
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
    /// be delivered. Refused when an adapter is unknown, the prompt does not fit the model's
    /// context, or the queue is full.
    pub fn submit(&self, s: Submission) -> Result<Receiver<Update>> {
        {
            let names = self.lock_names();
            if let Some(unknown) = s.adapters.iter().find(|a| !names.contains(a)) {
                return Err(Error::InvalidArgument(format!(
                    "unknown adapter `{unknown}`"
                )));
            }
        }
        if let Some(n) = self.context_limit {
            if s.prompt.len() >= n {
                return Err(Error::InvalidArgument(format!(
                    "a prompt of {} tokens leaves no room in the model's context of {n} positions",
                    s.prompt.len()
                )));
            }
        }
        if self.stats.queued.load(Ordering::SeqCst) >= self.limits.max_queue {
            return Err(Error::InvalidArgument(format!(
                "the queue is full ({} requests waiting)",
                self.limits.max_queue
            )));
        }
        let (tx, rx) = mpsc::channel();
        *self
            .stats
            .requests_by_adapter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(s.adapters.join("+"))
            .or_default() += 1;
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        self.command(Command::Submit(Box::new(s), tx))?;
        Ok(rx)
    }

    /// Stops taking requests, lets the running and queued ones finish, and joins the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The scheduler thread's state.
struct Scheduler {
    model: Arc<LanguageModel>,
    registry: HashMap<String, Adapter>,
    limits: EngineLimits,
    stats: Arc<EngineStats>,
    waiting: Vec<(u64, Submission)>,
    clients: BTreeMap<u64, Sender<Update>>,
    next_tag: u64,
    /// Adapters to remove once no waiting request needs them, with whom to tell.
    unloading: Vec<(String, Sender<Result<()>>)>,
}

impl Scheduler {
    fn run(mut self, rx: Receiver<Command>) {
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
                    Command::Submit(s, tx) => {
                        let tag = self.next_tag;
                        self.next_tag += 1;
                        self.clients.insert(tag, tx);
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
        for (names, group) in groups {
            let tags: Vec<u64> = group.iter().map(|(t, _)| *t).collect();
            let prompt_tokens: usize = group.iter().map(|(_, s)| s.prompt.len()).sum();
            match self.prefill(&names, group) {
                Ok(joining) => {
                    self.stats
                        .prompt_tokens
                        .fetch_add(prompt_tokens, Ordering::SeqCst);
                    if let Err(e) = batch.merge(joining) {
                        self.fail(&tags, &e.to_string());
                    }
                }
                Err(e) => self.fail(&tags, &e.to_string()),
            }
        }
        self.stats.running.store(batch.len(), Ordering::SeqCst);
    }

    /// One prefill of `group` with the adapters `names` (taken out of the registry for the pass
    /// and put back after).
    fn prefill(&mut self, names: &[String], group: Vec<(u64, Submission)>) -> Result<DecodeBatch> {
        let lm = Arc::clone(&self.model);
        let requests: Vec<Request> = group
            .into_iter()
            .map(|(tag, s)| Request {
                tag,
                prompt: s.prompt,
                cfg: s.cfg,
            })
            .collect();
        if names.is_empty() {
            return DecodeBatch::prefill(&lm.decoder, &lm.tokenizer, requests, &mut NoHooks);
        }
        let mut set = AdapterSet {
            adapters: Vec::with_capacity(names.len()),
        };
        let mut missing = None;
        for n in names {
            match self.registry.remove(n) {
                Some(a) => set.adapters.push(a),
                None => missing = Some(n.clone()),
            }
        }
        let out = match missing {
            // The same adapter twice in one request, or one not registered.
            Some(n) => Err(Error::InvalidArgument(format!(
                "adapter `{n}` is unknown or named twice in one request"
            ))),
            None => DecodeBatch::prefill(&lm.decoder, &lm.tokenizer, requests, &mut set),
        };
        for (n, a) in names.iter().zip(set.adapters) {
            self.registry.insert(n.clone(), a);
        }
        out
    }

    /// One decode step, routing events to their clients; clients that went away are cancelled.
    /// Finished requests hear of it after the counters are updated, so a client that has its
    /// answer sees its sequence gone from `running`.
    fn step(&mut self, batch: &mut DecodeBatch) {
        let lm = Arc::clone(&self.model);
        let mut gone = Vec::new();
        let mut finished = Vec::new();
        let clients = &self.clients;
        let result = batch.step(&lm.decoder, &lm.tokenizer, None, &mut |e| match e {
            Event::Text { tag, text } => {
                if let Some(tx) = clients.get(&tag) {
                    if tx.send(Update::Text(text)).is_err() {
                        gone.push(tag);
                    }
                }
            }
            Event::Done { tag, generation } => finished.push((tag, generation)),
        });
        if let Err(e) = result {
            let tags = batch.tags();
            let _ = batch.cancel(&tags);
            self.fail(&tags, &e.to_string());
        }
        if !gone.is_empty() {
            let _ = batch.cancel(&gone);
            for t in &gone {
                self.clients.remove(t);
            }
        }
        self.stats.running.store(batch.len(), Ordering::SeqCst);
        for (tag, generation) in finished {
            self.stats
                .generated_tokens
                .fetch_add(generation.ids.len(), Ordering::SeqCst);
            if let Some(tx) = self.clients.remove(&tag) {
                let _ = tx.send(Update::Done(generation));
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

    fn fail(&mut self, tags: &[u64], why: &str) {
        for t in tags {
            if let Some(tx) = self.clients.remove(t) {
                let _ = tx.send(Update::Failed(why.to_string()));
            }
        }
    }
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
    Error::InvalidArgument("the engine has stopped".into())
}
