//! The prompt queue, its single worker thread, and the history of finished prompts.

use std::collections::{BTreeMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde_json::{json, Map, Value as Json};

use super::clients::{Clients, PromptEvents};
use crate::execute::{Executor, OutputCache, RunError};
use crate::plugin::PluginSet;
use crate::workflow::Workflow;

/// A prompt waiting or running.
pub struct QueuedPrompt {
    pub number: u64,
    pub id: String,
    /// The prompt as the client sent it, for the queue and history listings.
    pub prompt: Json,
    pub workflow: Workflow,
    pub extra_data: Json,
    pub client_id: Option<String>,
    pub outputs_to_execute: Vec<String>,
}

impl QueuedPrompt {
    /// `[number, prompt_id, prompt, extra_data, outputs_to_execute]`, ComfyUI's queue item.
    pub fn listing(&self) -> Json {
        json!([
            self.number,
            self.id,
            self.prompt,
            self.extra_data,
            self.outputs_to_execute
        ])
    }
}

#[derive(Default)]
struct QueueState {
    pending: VecDeque<QueuedPrompt>,
    /// The listing of the prompt being run.
    running: Option<(String, Json)>,
    /// Finished prompts, oldest first, with their history entries.
    history: Vec<(String, Json)>,
}

/// One queue, one worker: prompts run in the order queued.
pub struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
    next_number: AtomicU64,
    /// The running prompt's cancel flag; cleared before each prompt starts.
    pub cancel: Arc<AtomicBool>,
    pub clients: Arc<Clients>,
}

/// The most finished prompts the history keeps (ComfyUI keeps 10 000).
const HISTORY_LIMIT: usize = 10_000;

impl Queue {
    pub fn new(clients: Arc<Clients>) -> Self {
        Self {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            next_number: AtomicU64::new(0),
            cancel: Arc::new(AtomicBool::new(false)),
            clients,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number the next queued prompt gets.
    pub fn number(&self) -> u64 {
        self.next_number.fetch_add(1, Ordering::SeqCst)
    }

    /// Adds a prompt at the end of the queue, or before everything waiting with `front`.
    pub fn push(&self, prompt: QueuedPrompt, front: bool) {
        {
            let mut state = self.lock();
            if front {
                state.pending.push_front(prompt);
            } else {
                state.pending.push_back(prompt);
            }
        }
        self.wake.notify_all();
        self.send_status();
    }

    /// Prompts waiting plus the one running.
    pub fn remaining(&self) -> usize {
        let state = self.lock();
        state.pending.len() + usize::from(state.running.is_some())
    }

    /// `{queue_running, queue_pending}` as ComfyUI lists them.
    pub fn listing(&self) -> Json {
        let state = self.lock();
        let running: Vec<Json> = state.running.iter().map(|(_, l)| l.clone()).collect();
        let pending: Vec<Json> = state.pending.iter().map(QueuedPrompt::listing).collect();
        json!({"queue_running": running, "queue_pending": pending})
    }

    /// Drops every waiting prompt.
    pub fn clear_pending(&self) {
        self.lock().pending.clear();
        self.send_status();
    }

    /// Drops the waiting prompts with these ids.
    pub fn delete_pending(&self, ids: &[String]) {
        self.lock().pending.retain(|p| !ids.contains(&p.id));
        self.send_status();
    }

    /// Asks the running prompt, if any, to stop at its next check; with `prompt_id`, only when
    /// that is the prompt running (so a late click never stops the next one).
    pub fn interrupt(&self, prompt_id: Option<&str>) {
        let state = self.lock();
        let matches = match (&state.running, prompt_id) {
            (Some(_), None) => true,
            (Some((running, _)), Some(id)) => running == id,
            (None, _) => false,
        };
        if matches {
            self.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// Stops the prompt `prompt_id` if it runs, drops it if it waits; whether it was either.
    pub fn cancel_job(&self, prompt_id: &str) -> bool {
        let running = self
            .lock()
            .running
            .as_ref()
            .is_some_and(|(id, _)| id == prompt_id);
        if running {
            self.interrupt(Some(prompt_id));
            return true;
        }
        let waiting = self.lock().pending.iter().any(|p| p.id == prompt_id);
        if waiting {
            self.delete_pending(&[prompt_id.to_owned()]);
        }
        waiting
    }

    /// Every history entry, by prompt id, the newest `max_items` when given.
    pub fn history(&self, max_items: Option<usize>) -> Json {
        let state = self.lock();
        let skip = max_items.map_or(0, |n| state.history.len().saturating_sub(n));
        let entries: Map<String, Json> = state.history[skip..].iter().cloned().collect();
        Json::Object(entries)
    }

    /// `{prompt_id: entry}`, or `{}` for an unknown id.
    pub fn history_of(&self, prompt_id: &str) -> Json {
        let state = self.lock();
        let entries: Map<String, Json> = state
            .history
            .iter()
            .filter(|(id, _)| id == prompt_id)
            .cloned()
            .collect();
        Json::Object(entries)
    }

    pub fn clear_history(&self) {
        self.lock().history.clear();
    }

    pub fn delete_history(&self, ids: &[String]) {
        self.lock().history.retain(|(id, _)| !ids.contains(id));
    }

    /// Tells every client how many prompts remain.
    pub fn send_status(&self) {
        self.clients.send(None, "status", self.status(None));
    }

    /// The data of a `status` message; `sid` for the first message to a new client.
    pub fn status(&self, sid: Option<&str>) -> Json {
        let mut data = json!({"status": {"exec_info": {"queue_remaining": self.remaining()}}});
        if let Some(sid) = sid {
            data["sid"] = json!(sid);
        }
        data
    }

    /// Waits for the next prompt and marks it running.
    fn next(&self) -> QueuedPrompt {
        let mut state = self.lock();
        loop {
            if let Some(prompt) = state.pending.pop_front() {
                state.running = Some((prompt.id.clone(), prompt.listing()));
                return prompt;
            }
            state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Records the finished prompt's history entry and marks nothing running.
    fn finish(&self, prompt_id: String, entry: Json) {
        let mut state = self.lock();
        state.running = None;
        state.history.push((prompt_id, entry));
        let excess = state.history.len().saturating_sub(HISTORY_LIMIT);
        state.history.drain(..excess);
    }
}

/// What the worker runs prompts with.
pub struct Worker {
    pub queue: Arc<Queue>,
    pub plugins: Arc<PluginSet>,
    pub settings: BTreeMap<String, String>,
}

impl Worker {
    /// Runs queued prompts, one at a time, for as long as the process lives. Node outputs are
    /// kept from one prompt to the next by input signature.
    pub fn run_forever(self) {
        let mut cache = OutputCache::default();
        loop {
            let prompt = self.queue.next();
            self.queue.cancel.store(false, Ordering::SeqCst);
            self.queue.send_status();
            let events = PromptEvents::new(
                &self.queue.clients,
                prompt.client_id.clone(),
                prompt.id.clone(),
            );
            let entry = self.run_one(&prompt, &events, &mut cache);
            self.queue.finish(prompt.id.clone(), entry);
            // As ComfyUI: the history entry exists before clients hear that the prompt ended.
            let mut end = Map::new();
            end.insert("node".into(), Json::Null);
            events.send("executing", end);
            self.queue.send_status();
        }
    }

    /// Runs one prompt, sending its events, and returns its history entry. A panic that
    /// escapes the run is reported as the prompt's error; the server goes on.
    fn run_one(
        &self,
        prompt: &QueuedPrompt,
        events: &PromptEvents,
        cache: &mut OutputCache,
    ) -> Json {
        let mut executor =
            Executor::new(&self.plugins, events).with_cancel_flag(self.queue.cancel.clone());
        for (key, value) in &self.settings {
            executor = executor.with_setting(key, value);
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            executor.run_cached(&prompt.workflow, cache)
        }));
        let succeeded = match result {
            Ok(Ok(_)) => true,
            Ok(Err(RunError::Invalid(report))) => {
                let mut data = Map::new();
                data.insert("node_id".into(), Json::Null);
                data.insert("node_type".into(), Json::Null);
                data.insert("exception_type".into(), json!("InvalidPrompt"));
                data.insert("exception_message".into(), json!(report.to_text()));
                events.send("execution_error", data);
                false
            }
            // The executor has sent `execution_error` or `execution_interrupted`.
            Ok(Err(RunError::Node(_) | RunError::Interrupted { .. })) => false,
            Err(panic) => {
                cache.clear();
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("the run panicked");
                let mut data = Map::new();
                data.insert("node_id".into(), Json::Null);
                data.insert("node_type".into(), Json::Null);
                data.insert("exception_type".into(), json!("Panic"));
                data.insert("exception_message".into(), json!(message));
                events.send("execution_error", data);
                false
            }
        };
        let record = std::mem::take(&mut *events.record.lock().unwrap_or_else(|e| e.into_inner()));
        // ComfyUI's `meta`: for each output, the node that shows it (the node itself here,
        // where there are no subgraphs to expand).
        let meta: Map<String, Json> = record
            .outputs
            .keys()
            .map(|node| {
                let about = json!({"node_id": node, "display_node": node,
                    "parent_node": null, "real_node_id": node});
                (node.clone(), about)
            })
            .collect();
        json!({
            "prompt": prompt.listing(),
            "outputs": record.outputs,
            "status": {
                "status_str": if succeeded { "success" } else { "error" },
                "completed": succeeded,
                "messages": record.messages,
            },
            "meta": meta,
        })
    }
}
