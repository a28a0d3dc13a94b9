// The chatstream web chat: streams answers from POST chat_stream?format=delta.
// Paths are relative so the page also works behind a reverse proxy under a prefix.
"use strict";

(() => {
  const BUSY_MESSAGE = "The server is busy right now. Please try again in a moment.";
  const DOWN_MESSAGE = "Cannot reach the server. Check that it is running and your connection, then try again.";
  const LOST_MESSAGE = "The connection was lost while the answer was streaming.";
  const PARAMS = ["temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty"];
  const INTEGER_PARAMS = new Set(["top_k", "max_new_tokens"]);

  const byId = (id) => document.getElementById(id);
  const messages = byId("messages");
  const empty = byId("empty");
  const composer = byId("composer");
  const input = byId("input");
  const sendButton = byId("send");
  const stopButton = byId("stop");
  const regenerateButton = byId("regenerate");
  const clearButton = byId("clear");
  const notice = byId("notice");
  const settings = byId("settings");
  const settingsToggle = byId("settings-toggle");
  const paramsForm = byId("params");
  const paramsStatus = byId("params-status");

  let controller = null; // the AbortController of the answer being streamed, if any
  let composing = false; // an IME composition is in progress (Japanese, Chinese, ...)

  // -- notices ----------------------------------------------------------------------------------
  function showNotice(text) {
    notice.textContent = text;
    notice.hidden = false;
  }

  function clearNotice() {
    notice.hidden = true;
    notice.textContent = "";
  }

  /** The user-facing message for a JSON error response. */
  async function errorMessage(response) {
    let data = {};
    try {
      data = await response.json();
    } catch {
      // not JSON after all: fall back to the status
    }
    if (response.status === 429 || data.error === "too_many_requests") return BUSY_MESSAGE;
    if (data.message) return data.message;
    if (data.error) return `The server refused the request (${data.error}).`;
    return `The server answered with status ${response.status}.`;
  }

  /** A response carries an error when it is not OK or is JSON (the stream itself is plain text). */
  function isError(response) {
    const type = response.headers.get("Content-Type") || "";
    return !response.ok || type.includes("application/json");
  }

  // -- the conversation -------------------------------------------------------------------------
  function nearBottom() {
    const root = document.scrollingElement;
    return root.scrollHeight - root.scrollTop - root.clientHeight < 80;
  }

  function scrollToEnd() {
    const root = document.scrollingElement;
    root.scrollTop = root.scrollHeight;
  }

  function makeButton(label, className, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = className;
    button.textContent = label;
    button.addEventListener("click", onClick);
    return button;
  }

  // A thumb drawn on a 24x24 grid: a cuff on the left, the hand pointing up.
  const THUMB_PATH = "M2 10h4v11H2zM8 10l4-8c1.7 0 3 1.3 3 3v3h5c1.1 0 2 .9 2 2l-2 9c-.2.6-.8 1-1.5 1H8z";

  function thumbIcon() {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", THUMB_PATH);
    svg.append(path);
    return svg;
  }

  function addMessage(role, text) {
    const item = document.createElement("li");
    item.className = `message ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    item.append(who, body);
    if (role === "assistant") {
      const actions = document.createElement("div");
      actions.className = "feedback";
      const like = makeButton("", "icon like", () => sendFeedback(item, "like"));
      const dislike = makeButton("", "icon dislike", () => sendFeedback(item, "dislike"));
      like.setAttribute("aria-label", "Good answer");
      dislike.setAttribute("aria-label", "Bad answer");
      for (const button of [like, dislike]) {
        button.append(thumbIcon());
        button.title = button.getAttribute("aria-label");
        button.setAttribute("aria-pressed", "false");
        button.disabled = true; // until the answer has its message id
      }
      actions.append(like, dislike);
      item.append(actions);
    }
    messages.append(item);
    updateControls();
    return item;
  }

  function lastAnswer() {
    const last = messages.lastElementChild;
    return last && last.classList.contains("assistant") ? last : null;
  }

  function updateControls() {
    const streaming = controller !== null;
    sendButton.hidden = streaming;
    stopButton.hidden = !streaming;
    regenerateButton.disabled = streaming || lastAnswer() === null;
    clearButton.disabled = streaming;
    empty.hidden = messages.childElementCount > 0;
  }

  function setFeedbackEnabled(answer, enabled) {
    for (const button of answer.querySelectorAll(".feedback button")) button.disabled = !enabled;
  }

  /**
   * Stream one answer into `answer`. Returns "done", "stopped" (the user pressed Stop),
   * "lost" (the connection broke mid-answer) or "failed" (nothing was streamed: busy, down, refused).
   */
  async function streamAnswer(body, answer) {
    const text = answer.querySelector(".text");
    controller = new AbortController();
    const signal = controller.signal;
    answer.setAttribute("aria-busy", "true");
    answer.classList.remove("stopped");
    setFeedbackEnabled(answer, false);
    updateControls();
    try {
      let response;
      try {
        response = await fetch("chat_stream?format=delta", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(body),
          signal,
        });
      } catch {
        if (signal.aborted) return "failed";
        showNotice(DOWN_MESSAGE);
        return "failed";
      }
      if (isError(response)) {
        showNotice(await errorMessage(response));
        return "failed";
      }
      answer.dataset.messageId = response.headers.get("X-Message-Id") || "";
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      try {
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          const follow = nearBottom();
          text.append(decoder.decode(value, { stream: true }));
          if (follow) scrollToEnd();
        }
        text.append(decoder.decode());
        return "done";
      } catch {
        if (signal.aborted) {
          answer.classList.add("stopped");
          return "stopped";
        }
        showNotice(LOST_MESSAGE);
        return "lost";
      } finally {
        text.normalize();
        setFeedbackEnabled(answer, Boolean(answer.dataset.messageId));
      }
    } finally {
      answer.removeAttribute("aria-busy");
      controller = null;
      updateControls();
    }
  }

  async function send(userInput) {
    clearNotice();
    const question = addMessage("user", userInput);
    const answer = addMessage("assistant", "");
    scrollToEnd();
    const result = await streamAnswer({ user_input: userInput }, answer);
    if (result === "failed") {
      // Nothing was answered: take the turn back and give the text back for another try.
      answer.remove();
      question.remove();
      if (!input.value) input.value = userInput;
      resizeInput();
      updateControls();
    }
  }

  async function regenerate() {
    const answer = lastAnswer();
    if (!answer || controller) return;
    clearNotice();
    const text = answer.querySelector(".text");
    const previous = text.textContent;
    const previousId = answer.dataset.messageId;
    text.textContent = "";
    for (const button of answer.querySelectorAll(".feedback button")) button.setAttribute("aria-pressed", "false");
    const result = await streamAnswer({ regenerate: true }, answer);
    if (result === "failed") {
      text.textContent = previous;
      answer.dataset.messageId = previousId || "";
      setFeedbackEnabled(answer, Boolean(previousId));
    }
  }

  async function clearChat() {
    if (controller) return;
    clearNotice();
    try {
      const response = await fetch("clear_context", { method: "POST" });
      if (!response.ok) {
        showNotice(await errorMessage(response));
        return;
      }
    } catch {
      showNotice(DOWN_MESSAGE);
      return;
    }
    messages.replaceChildren();
    updateControls();
    input.focus();
  }

  async function sendFeedback(answer, type) {
    const messageId = answer.dataset.messageId;
    if (!messageId) return;
    clearNotice();
    try {
      const response = await fetch("set_feedback", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ message_id: messageId, type }),
      });
      if (!response.ok) {
        showNotice(await errorMessage(response));
        return;
      }
    } catch {
      showNotice(DOWN_MESSAGE);
      return;
    }
    answer.querySelector(".like").setAttribute("aria-pressed", String(type === "like"));
    answer.querySelector(".dislike").setAttribute("aria-pressed", String(type === "dislike"));
  }

  // -- the message box --------------------------------------------------------------------------
  function resizeInput() {
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
  }

  input.addEventListener("compositionstart", () => {
    composing = true;
  });
  input.addEventListener("compositionend", () => {
    composing = false;
  });
  input.addEventListener("input", resizeInput);
  input.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.shiftKey) return;
    // Enter while an IME is composing confirms the conversion; it must not send.
    // keyCode 229 is what Safari reports for that Enter just after compositionend.
    if (event.isComposing || composing || event.keyCode === 229) return;
    event.preventDefault();
    composer.requestSubmit();
  });

  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    if (controller) return;
    const userInput = input.value;
    if (!userInput.trim()) return;
    input.value = "";
    resizeInput();
    send(userInput);
  });

  stopButton.addEventListener("click", () => {
    if (controller) controller.abort();
    input.focus();
  });
  regenerateButton.addEventListener("click", regenerate);
  clearButton.addEventListener("click", clearChat);

  // -- generation settings ----------------------------------------------------------------------
  function fillParams(values) {
    for (const name of PARAMS) {
      const field = paramsForm.elements[name];
      field.value = values[name] === null || values[name] === undefined ? "" : String(values[name]);
    }
  }

  async function loadParams() {
    try {
      const response = await fetch("get_generation_params");
      if (!response.ok) {
        paramsStatus.textContent = await errorMessage(response);
        return;
      }
      fillParams(await response.json());
    } catch {
      paramsStatus.textContent = DOWN_MESSAGE;
    }
  }

  paramsForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const values = {};
    for (const name of PARAMS) {
      const raw = paramsForm.elements[name].value.trim();
      if (raw === "") {
        if (name === "repetition_penalty") values[name] = null; // empty means "no penalty"
        continue;
      }
      const number = Number(raw);
      if (!Number.isFinite(number) || (INTEGER_PARAMS.has(name) && !Number.isInteger(number))) {
        paramsStatus.textContent = `${name}: "${raw}" is not a valid ${INTEGER_PARAMS.has(name) ? "whole number" : "number"}.`;
        paramsForm.elements[name].focus();
        return;
      }
      values[name] = number;
    }
    paramsStatus.textContent = "Saving…";
    try {
      const response = await fetch("set_generation_params", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(values),
      });
      if (!response.ok) {
        paramsStatus.textContent = await errorMessage(response);
        return;
      }
      fillParams(await response.json());
      paramsStatus.textContent = "Saved.";
    } catch {
      paramsStatus.textContent = DOWN_MESSAGE;
    }
  });

  settingsToggle.addEventListener("click", () => {
    const open = settings.hidden;
    settings.hidden = !open;
    settingsToggle.setAttribute("aria-expanded", String(open));
    if (open) {
      paramsStatus.textContent = "";
      loadParams();
    }
  });

  updateControls();
  input.focus();
})();
