// What several pages show: the headline metric, task lists, the training-file form.
import { api, session } from "../api.js";
import { h } from "../dom.js";

export const HEADLINE = ["val_macro_f1", "val_micro_f1", "val_r2", "val_token_accuracy", "val_loss"];

export function headline(metrics) {
  for (const name of HEADLINE) {
    if (metrics && typeof metrics[name] === "number") return [name, metrics[name]];
  }
  return [null, null];
}

export function tasksOfBase() {
  return session.base && session.base.kind === "causal_lm"
    ? ["generation"] : ["classification", "regression", "multilabel"];
}

// A form that uploads a training file (multipart) and starts a job; `onJob(job)` on success.
export function trainForm({ adapter = null, onJob }) {
  const file = h("input", { type: "file", name: "training_file", required: true,
                            accept: ".jsonl,.json,.csv,.parquet,text/csv,application/json" });
  const name = adapter ? null : h("input", { name: "name", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,127}",
                                               placeholder: "support-tickets" });
  const task = adapter ? null : h("select", { name: "task" },
    tasksOfBase().map((t) => h("option", { value: t }, t)));
  const epochs = h("input", { type: "number", name: "epochs", min: 1, max: 200, placeholder: "default" });
  const promote = h("select", { name: "promote" },
    ["if_better", "always", "never"].map((p) => h("option", { value: p }, p)));
  const status = h("p", { role: "status" });
  const submit = h("button", { type: "submit" }, adapter ? "Train a new version" : "Create and train");
  const form = h("form", { class: "stack", "data-form": adapter ? "retrain" : "create" },
    name && h("label", {}, "Name", name),
    task && h("label", {}, "Task", task),
    h("label", {}, "Training file (JSONL or CSV: text,label)", file),
    h("label", {}, "Epochs", epochs),
    h("label", {}, "Promote the new version", promote),
    submit, status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = new FormData();
    if (name) body.append("name", name.value.trim());
    if (task) body.append("task", task.value);
    body.append("training_file", file.files[0], file.files[0].name);
    body.append("promote", promote.value);
    if (epochs.value) body.append("hyperparameters", JSON.stringify({ epochs: Number(epochs.value) }));
    submit.disabled = true;
    status.className = "";
    status.textContent = "Uploading…";
    try {
      const path = adapter ? `/v1/adapters/${encodeURIComponent(adapter)}/versions` : "/v1/adapters";
      const made = await api(path, { method: "POST", form: body });
      onJob(made.job, made.adapter);
    } catch (error) {
      status.className = "error";
      status.textContent = error.message;
      submit.disabled = false;
    }
  });
  return form;
}
