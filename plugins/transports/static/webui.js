// The chatstream web chat: streams answers from POST chat_stream?format=delta, and lists the
// browser session's conversations (GET/POST/DELETE conversations...) in a sidebar.
// Paths are relative so the page also works behind a reverse proxy under a prefix.
"use strict";

(() => {
  const BUSY_MESSAGE = "The server is busy right now. Please try again in a moment.";
  const DOWN_MESSAGE = "Cannot reach the server. Check that it is running and your connection, then try again.";
  const LOST_MESSAGE = "The connection was lost while the answer was streaming.";
  const SESSION_BUSY_MESSAGE =
    "An answer is still being written for this chat (perhaps in another tab). Stop it or wait, then try again.";
  const UNTITLED = "Untitled";
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
  const sidebar = byId("sidebar");
  const sidebarToggle = byId("sidebar-toggle");
  const newChatButton = byId("new-chat");
  const conversationList = byId("conversation-list");
  const conversationsStatus = byId("conversations-status");
  const phone = window.matchMedia("(max-width: 640px)"); // where the sidebar folds away (see webui.css)

  let controller = null; // the AbortController of the answer being streamed, if any
  let composing = false; // an IME composition is in progress (Japanese, Chinese, ...)
  const sources = new WeakMap(); // assistant message -> its markdown source, as streamed so far
  let conversations = []; // the session's conversations, as last listed: {id, title, created_at, updated_at}
  let currentId = null; // the conversation on screen; null before its first message makes it
  let pendingWork = null; // the promise of a restore, open, new or delete in progress
  let editing = null; // {id, mode: "rename" | "delete"} while a conversation's row shows its editor
  let refreshWanted = false; // a list refresh waits for the editor to close
  let listSeq = 0; // only the newest list response is shown

  // -- markdown ---------------------------------------------------------------------------------
  // Answers are markdown: marked turns them into HTML, DOMPurify cleans that HTML, and only then
  // does it reach the DOM. Raw HTML the model writes is shown as text, never as markup.
  // Without the vendored libraries (they failed to load) answers are shown as plain text.
  const markdown = window.marked && window.DOMPurify ? makeMarkdown(window.marked, window.DOMPurify) : null;

  function escapeHtml(text) {
    return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  }

  function makeMarkdown(marked, purify) {
    const parser = new marked.Marked({ gfm: true, breaks: true, async: false });
    parser.use({
      renderer: {
        html(token) {
          const text = escapeHtml(token.text.replace(/\n+$/, ""));
          return token.block ? `<p>${text.replace(/\n/g, "<br>")}</p>\n` : text;
        },
      },
    });
    // Links open in a new tab that cannot reach back to this page; no other target is kept.
    purify.addHook("afterSanitizeAttributes", (node) => {
      if (node.hasAttribute("target")) node.removeAttribute("target");
      if (node.localName === "a" && node.hasAttribute("href")) {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer");
      }
    });
    const config = {
      RETURN_DOM_FRAGMENT: true,
      // Inline styles are refused by the Content-Security-Policy anyway; forms have no place here
      // (task list checkboxes, disabled inputs, are kept).
      FORBID_TAGS: ["style", "form", "button", "textarea", "select"],
      FORBID_ATTR: ["style"],
    };
    return (source) => purify.sanitize(parser.parse(source).trim(), config);
  }

  /** A code block with a header: its language (if given) and a Copy button. */
  function codeBlock(pre) {
    const code = pre.querySelector("code");
    const block = document.createElement("div");
    block.className = "code-block";
    const header = document.createElement("div");
    header.className = "code-header";
    const language = document.createElement("span");
    language.className = "code-language";
    const match = code && /(?:^|\s)language-(\S+)/.exec(code.className);
    language.textContent = match ? match[1] : "";
    const copy = makeButton("Copy", "copy-code", () => copyCode(copy, pre));
    copy.setAttribute("aria-label", "Copy code");
    header.append(language, copy);
    pre.replaceWith(block);
    block.append(header, pre);
  }

  /** Show the markdown `source` in the message body `body`. */
  function renderMarkdown(body, source) {
    if (!markdown) {
      body.classList.add("plain");
      body.textContent = source;
      return;
    }
    const fragment = markdown(source);
    for (const pre of fragment.querySelectorAll("pre")) codeBlock(pre);
    body.replaceChildren(fragment);
  }

  async function writeClipboard(text, pre) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    // Plain http on another host has no clipboard API: copy the selected code the old way.
    const selection = window.getSelection();
    selection.selectAllChildren(pre);
    const copied = document.execCommand("copy");
    selection.removeAllRanges();
    if (!copied) throw new Error("copy refused");
  }

  async function copyCode(button, pre) {
    let label = "Copied";
    try {
      await writeClipboard(pre.textContent.replace(/\n$/, ""), pre);
    } catch {
      label = "Copy failed";
    }
    button.textContent = label;
    button.setAttribute("aria-label", label === "Copied" ? "Copied code" : "Copy failed");
    button.classList.toggle("copied", label === "Copied");
    clearTimeout(button.resetTimer);
    button.resetTimer = setTimeout(() => {
      button.textContent = "Copy";
      button.setAttribute("aria-label", "Copy code");
      button.classList.remove("copied");
    }, 2000);
  }

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
    if (data.error === "session_busy") return SESSION_BUSY_MESSAGE;
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

  // Icons drawn on a 24x24 grid. The thumb: a cuff on the left, the hand pointing up.
  const THUMB_PATH = "M2 10h4v11H2zM8 10l4-8c1.7 0 3 1.3 3 3v3h5c1.1 0 2 .9 2 2l-2 9c-.2.6-.8 1-1.5 1H8z";
  const PENCIL_PATH = "M4 20h4L19 9l-4-4L4 16zM13 7l4 4";
  const BIN_PATH = "M4 7h16M9 7V4h6v3M6 7l1 13h10l1-13M10 11v5M14 11v5";
  const MENU_PATH = "M4 6h16M4 12h16M4 18h16";

  function svgIcon(d) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", d);
    svg.append(path);
    return svg;
  }

  const thumbIcon = () => svgIcon(THUMB_PATH);

  function addMessage(role, text) {
    const item = document.createElement("li");
    item.className = `message ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "text";
    item.append(who, body);
    if (role === "assistant") {
      setAnswerText(item, text);
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
    } else {
      body.classList.add("plain"); // what the user typed is shown as typed
      body.textContent = text;
    }
    messages.append(item);
    updateControls();
    return item;
  }

  /** Set an answer's markdown source and render it now. */
  function setAnswerText(answer, source) {
    sources.set(answer, source);
    renderMarkdown(answer.querySelector(".text"), source);
  }

  function lastAnswer() {
    const last = messages.lastElementChild;
    return last && last.classList.contains("assistant") ? last : null;
  }

  /** Whether the shown conversation may not change now: an answer streams, or a switch is under way. */
  function conversationLocked() {
    return controller !== null || pendingWork !== null;
  }

  function updateControls() {
    const streaming = controller !== null;
    const locked = conversationLocked();
    sendButton.hidden = streaming;
    stopButton.hidden = !streaming;
    regenerateButton.disabled = locked || lastAnswer() === null;
    clearButton.disabled = locked;
    newChatButton.disabled = locked;
    for (const button of conversationList.querySelectorAll("button[data-locks]")) button.disabled = locked;
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
    let source = "";
    let frame = 0; // the pending animation frame's id; 0 when none
    // Re-render at most once a frame, not on every token: each render parses the whole answer.
    const render = () => {
      frame = 0;
      const follow = nearBottom();
      setAnswerText(answer, source);
      if (follow) scrollToEnd();
    };
    const flush = () => {
      if (frame) cancelAnimationFrame(frame);
      render();
    };
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
          source += decoder.decode(value, { stream: true });
          if (!frame) frame = requestAnimationFrame(render);
        }
        source += decoder.decode();
        return "done";
      } catch {
        if (signal.aborted) {
          answer.classList.add("stopped");
          return "stopped";
        }
        showNotice(LOST_MESSAGE);
        return "lost";
      } finally {
        flush(); // the answer on screen is all that arrived, even if it stopped mid-frame
        setFeedbackEnabled(answer, Boolean(answer.dataset.messageId));
      }
    } finally {
      answer.removeAttribute("aria-busy");
      controller = null;
      updateControls();
    }
  }

  /** A chat_stream body for the conversation on screen (another tab may have opened another one). */
  function turnBody(fields) {
    return currentId ? { ...fields, conversation_id: currentId } : fields;
  }

  async function send(userInput) {
    clearNotice();
    const question = addMessage("user", userInput);
    const answer = addMessage("assistant", "");
    scrollToEnd();
    const result = await streamAnswer(turnBody({ user_input: userInput }), answer);
    if (result === "failed") {
      // Nothing was answered: take the turn back and give the text back for another try.
      answer.remove();
      question.remove();
      if (!input.value) input.value = userInput;
      resizeInput();
      updateControls();
    }
    // The first message makes the conversation; every answer changes the order of the list.
    refreshConversations();
  }

  async function regenerate() {
    const answer = lastAnswer();
    if (!answer || conversationLocked()) return;
    clearNotice();
    const previous = sources.get(answer) || "";
    const previousId = answer.dataset.messageId;
    setAnswerText(answer, "");
    for (const button of answer.querySelectorAll(".feedback button")) button.setAttribute("aria-pressed", "false");
    const result = await streamAnswer(turnBody({ regenerate: true }), answer);
    if (result === "failed") {
      setAnswerText(answer, previous);
      answer.dataset.messageId = previousId || "";
      setFeedbackEnabled(answer, Boolean(previousId));
    }
    refreshConversations();
  }

  async function clearChat() {
    if (conversationLocked()) return;
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
    refreshConversations();
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

  // -- conversations ----------------------------------------------------------------------------
  // The sidebar lists the session's conversations; the one on screen is marked aria-current. The
  // list is read again after every answer (the first message makes a conversation, answers reorder
  // the list). Opening, starting and deleting wait while an answer streams: the server refuses to
  // change the conversation under a running answer, so the UI does not ask.
  const conversationPath = (id) => `conversations/${encodeURIComponent(id)}`;
  let editorCount = 0; // makes each editor's hint id unique

  // A stopped answer ends on the server a moment after the browser stops reading it; until then
  // the session counts as busy (409 session_busy). A change asked for right after Stop waits for it.
  const BUSY_RETRIES = 15;
  const BUSY_RETRY_MS = 200;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /**
   * Fetch `path` and return its JSON body; a refusal or a network failure throws the message to show.
   * With `waitWhileBusy`, a session_busy refusal is asked again for a few seconds first.
   */
  async function callApi(path, init = {}, waitWhileBusy = false) {
    for (let attempt = 0; ; attempt++) {
      let response;
      try {
        response = await fetch(path, init);
      } catch {
        throw new Error(DOWN_MESSAGE);
      }
      if (response.ok) return response.json();
      if (waitWhileBusy && response.status === 409 && attempt < BUSY_RETRIES) {
        const data = await response
          .clone()
          .json()
          .catch(() => ({}));
        if (data.error === "session_busy") {
          await sleep(BUSY_RETRY_MS);
          continue;
        }
      }
      const error = new Error(await errorMessage(response));
      error.status = response.status;
      throw error;
    }
  }

  function postJson(body) {
    return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  }

  /** Run `work` as the one conversation change in progress; resolves (never rejects) when it ends. */
  function startWork(work) {
    const done = (async () => {
      try {
        await work();
      } catch (error) {
        showNotice(error.message || String(error));
      }
    })();
    const tracked = done.finally(() => {
      if (pendingWork === tracked) pendingWork = null;
      updateControls();
    });
    pendingWork = tracked;
    updateControls();
    return tracked;
  }

  /** Show a stored conversation's messages in place of the ones on screen. */
  function showConversation(conversation) {
    currentId = conversation.id;
    messages.replaceChildren();
    const contents = conversation.messages || [];
    // Messages carry the prompt format's role names; the user's turns come first.
    const requester = contents.some((m) => m.role === "user") ? "user" : contents.length ? contents[0].role : "user";
    for (const content of contents) {
      if (content.role === requester) {
        addMessage("user", content.message || "");
        continue;
      }
      const answer = addMessage("assistant", content.message || "");
      answer.dataset.messageId = content.id || "";
      if (content.message === null) answer.classList.add("stopped"); // an answer that never finished
      setFeedbackEnabled(answer, Boolean(content.id) && content.message !== null);
    }
    updateControls();
    scrollToEnd();
  }

  function titleOf(conversation) {
    return (conversation.title || "").trim() || UNTITLED;
  }

  function rowOf(id) {
    for (const item of conversationList.children) if (item.dataset.id === id) return item;
    return null;
  }

  function focusRow(id, action) {
    const item = id === null ? null : rowOf(id);
    const target = item && item.querySelector(`[data-action="${action}"]`);
    if (target) target.focus();
    return Boolean(target);
  }

  function conversationItem(conversation) {
    const item = document.createElement("li");
    item.className = "conversation";
    item.dataset.id = conversation.id;
    const current = conversation.id === currentId;
    item.classList.toggle("current", current);
    if (editing && editing.id === conversation.id) {
      item.append(editing.mode === "rename" ? renameEditor(conversation) : deleteConfirmation(conversation));
      return item;
    }
    const title = titleOf(conversation);
    const open = makeButton(title, "conversation-open", () => openConversation(conversation.id));
    open.dataset.action = "open";
    open.dataset.locks = "";
    open.title = title;
    if (current) open.setAttribute("aria-current", "true");
    const rename = makeButton("", "icon-button conversation-action", () => startEditing(conversation.id, "rename"));
    rename.dataset.action = "rename";
    rename.setAttribute("aria-label", `Rename “${title}”`);
    rename.title = "Rename";
    rename.append(svgIcon(PENCIL_PATH));
    const remove = makeButton("", "icon-button conversation-action", () => startEditing(conversation.id, "delete"));
    remove.dataset.action = "delete";
    remove.dataset.locks = "";
    remove.setAttribute("aria-label", `Delete “${title}”`);
    remove.title = "Delete";
    remove.append(svgIcon(BIN_PATH));
    const locked = conversationLocked();
    open.disabled = locked;
    remove.disabled = locked;
    item.append(open, rename, remove);
    return item;
  }

  /** An editor closes when focus leaves its row for somewhere else on the page. */
  function closeOnFocusLeaving(box, id) {
    box.addEventListener("focusout", (event) => {
      // Not while the row's own request runs: its button is disabled meanwhile, which moves focus.
      if (box.contains(event.relatedTarget) || !document.hasFocus() || box.dataset.saving || pendingWork) return;
      if (editing && editing.id === id) stopEditing(null);
    });
  }

  function renameEditor(conversation) {
    const form = document.createElement("form");
    form.className = "conversation-editor";
    form.noValidate = true;
    const field = document.createElement("input");
    field.type = "text";
    field.value = conversation.title;
    field.maxLength = 200;
    field.autocomplete = "off";
    field.dataset.action = "title";
    field.setAttribute("aria-label", "Conversation title");
    const hint = document.createElement("p");
    hint.className = "editor-hint";
    hint.id = `editor-hint-${++editorCount}`;
    hint.textContent = "Enter to save, Escape to cancel.";
    field.setAttribute("aria-describedby", hint.id);
    field.addEventListener("keydown", (event) => {
      if (event.key !== "Escape" || event.isComposing) return; // Escape in an IME drops the conversion only
      event.preventDefault();
      event.stopPropagation();
      stopEditing("rename");
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      saveTitle(conversation, form, field, hint);
    });
    closeOnFocusLeaving(form, conversation.id);
    form.append(field, hint);
    return form;
  }

  async function saveTitle(conversation, form, field, hint) {
    const title = field.value.trim();
    const refuse = (text) => {
      hint.textContent = text;
      hint.classList.add("error");
      field.setAttribute("aria-invalid", "true");
      field.focus();
    };
    if (!title) {
      refuse("A title needs at least one visible character.");
      return;
    }
    if (title === conversation.title) {
      stopEditing("rename");
      return;
    }
    form.dataset.saving = "true";
    field.readOnly = true;
    let renamed;
    try {
      renamed = await callApi(conversationPath(conversation.id), postJson({ title }));
    } catch (error) {
      delete form.dataset.saving;
      field.readOnly = false;
      refuse(error.message);
      return;
    }
    conversation.title = renamed.title;
    stopEditing("rename");
    refreshConversations(); // a renamed conversation moves to the top
  }

  function deleteConfirmation(conversation) {
    const box = document.createElement("div");
    box.className = "conversation-editor confirm";
    box.setAttribute("role", "group");
    const question = document.createElement("p");
    question.className = "confirm-question";
    question.id = `editor-hint-${++editorCount}`;
    question.textContent = `Delete “${titleOf(conversation)}”?`;
    box.setAttribute("aria-labelledby", question.id);
    const confirm = makeButton("Delete", "danger", () => deleteConversation(conversation.id));
    confirm.dataset.action = "confirm-delete";
    confirm.dataset.locks = "";
    confirm.disabled = conversationLocked();
    const cancel = makeButton("Cancel", "secondary", () => stopEditing("delete"));
    cancel.dataset.action = "cancel-delete";
    box.addEventListener("keydown", (event) => {
      if (event.key !== "Escape") return;
      event.preventDefault();
      event.stopPropagation();
      stopEditing("delete");
    });
    closeOnFocusLeaving(box, conversation.id);
    const actions = document.createElement("div");
    actions.className = "confirm-actions";
    actions.append(confirm, cancel);
    box.append(question, actions);
    return box;
  }

  function replaceRow(id) {
    const item = rowOf(id);
    const conversation = conversations.find((c) => c.id === id);
    if (item && conversation) item.replaceWith(conversationItem(conversation));
  }

  function startEditing(id, mode) {
    if (editing) stopEditing(null);
    editing = { id, mode };
    replaceRow(id);
    if (mode === "rename") {
      const field = rowOf(id).querySelector("input");
      field.focus();
      field.select();
    } else {
      focusRow(id, "cancel-delete"); // the harmless choice first
    }
  }

  /** Close the open editor; `focusAction` names the row's button to focus after (null: none). */
  function stopEditing(focusAction) {
    if (!editing) return;
    const { id } = editing;
    editing = null;
    replaceRow(id);
    if (focusAction) focusRow(id, focusAction);
    if (refreshWanted) refreshConversations();
  }

  function renderConversations() {
    const focused = document.activeElement;
    const item = focused && conversationList.contains(focused) ? focused.closest("li") : null;
    const focusKey = item ? [item.dataset.id, focused.dataset.action] : null;
    conversationList.replaceChildren(...conversations.map(conversationItem));
    if (focusKey && !focusRow(...focusKey)) newChatButton.focus();
    updateControls();
  }

  /** List the session's conversations again; resolves with the response (null when it failed or was stale). */
  async function refreshConversations() {
    if (editing) {
      refreshWanted = true; // typing in the editor is not interrupted: the list waits
      return null;
    }
    refreshWanted = false;
    const seq = ++listSeq;
    let listed;
    try {
      listed = await callApi("conversations");
    } catch (error) {
      if (seq === listSeq) conversationsStatus.textContent = `The conversations could not be listed. ${error.message}`;
      return null;
    }
    if (seq !== listSeq) return null;
    conversationsStatus.textContent = "";
    conversations = listed.conversations || [];
    if (currentId === null) currentId = listed.current;
    if (editing) refreshWanted = true; // an editor opened meanwhile: redraw when it closes
    else renderConversations();
    return listed;
  }

  /** On page load: the list, and the current conversation's messages in place of the empty chat. */
  async function restore() {
    const listed = await refreshConversations();
    if (!listed || !listed.current) return;
    const conversation = await callApi(conversationPath(listed.current));
    if (messages.childElementCount === 0) showConversation(conversation);
    renderConversations();
  }

  function openConversation(id) {
    if (conversationLocked()) return;
    if (id === currentId) {
      closeSidebarOnPhone();
      input.focus();
      return;
    }
    clearNotice();
    startWork(async () => {
      let opened;
      try {
        opened = await callApi(`${conversationPath(id)}/open`, { method: "POST" }, true);
      } catch (error) {
        if (error.status === 404) refreshConversations(); // deleted elsewhere: drop it from the list
        throw error;
      }
      showConversation(opened);
      renderConversations();
      closeSidebarOnPhone();
      input.focus();
    });
  }

  function newChat() {
    if (conversationLocked()) return;
    clearNotice();
    const shown = conversations.find((c) => c.id === currentId);
    if (shown && !shown.title && messages.childElementCount === 0) {
      // Already an untitled, empty conversation: that is the new chat.
      closeSidebarOnPhone();
      input.focus();
      return;
    }
    startWork(async () => {
      const made = await callApi("conversations", postJson({}), true);
      showConversation(made);
      conversations = [made, ...conversations.filter((c) => c.id !== made.id)];
      renderConversations();
      closeSidebarOnPhone();
      input.focus();
    });
  }

  function deleteConversation(id) {
    if (conversationLocked()) return;
    clearNotice();
    startWork(async () => {
      try {
        await callApi(conversationPath(id), { method: "DELETE" }, true);
      } catch (error) {
        if (error.status !== 404) {
          focusRow(id, "cancel-delete");
          throw error;
        }
        // already gone (deleted in another tab): what the user asked for
      }
      const index = conversations.findIndex((c) => c.id === id);
      if (index >= 0) conversations.splice(index, 1);
      editing = null;
      if (id === currentId) {
        // The next message starts a new conversation.
        currentId = null;
        messages.replaceChildren();
      }
      pendingWork = null; // the buttons below may take focus now
      renderConversations();
      const next = conversations[Math.max(0, Math.min(index, conversations.length - 1))];
      if (!next || !focusRow(next.id, "open")) newChatButton.focus();
      refreshConversations();
    });
  }

  newChatButton.addEventListener("click", newChat);

  // Up and down arrows move between the conversations (Tab still reaches every button).
  conversationList.addEventListener("keydown", (event) => {
    const keys = ["ArrowDown", "ArrowUp", "Home", "End"];
    if (!keys.includes(event.key) || event.target.dataset.action !== "open") return;
    const buttons = [...conversationList.querySelectorAll('[data-action="open"]')];
    const at = buttons.indexOf(event.target);
    const to = { ArrowDown: at + 1, ArrowUp: at - 1, Home: 0, End: buttons.length - 1 }[event.key];
    if (to < 0 || to >= buttons.length) return;
    event.preventDefault();
    buttons[to].focus();
  });

  // -- the sidebar on a phone -------------------------------------------------------------------
  // Narrow screens fold the sidebar away behind the toggle in the top bar; it then opens over the
  // chat, which keeps its width.
  function setSidebarOpen(open) {
    sidebar.classList.toggle("open", open);
    sidebarToggle.setAttribute("aria-expanded", String(open));
  }

  function closeSidebarOnPhone() {
    if (phone.matches && sidebar.classList.contains("open")) setSidebarOpen(false);
  }

  sidebarToggle.append(svgIcon(MENU_PATH));
  sidebarToggle.addEventListener("click", () => {
    const open = !sidebar.classList.contains("open");
    setSidebarOpen(open);
    if (open) {
      const current = conversationList.querySelector('[aria-current="true"]');
      (current && !current.disabled ? current : newChatButton).focus();
    }
  });
  sidebar.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || !phone.matches || !sidebar.classList.contains("open")) return;
    setSidebarOpen(false);
    sidebarToggle.focus();
  });

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

  composer.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (controller) return;
    const userInput = input.value;
    if (!userInput.trim()) return;
    input.value = "";
    resizeInput();
    // A message typed while a conversation is being opened continues that one, once it is shown.
    while (pendingWork) await pendingWork;
    if (controller) {
      if (!input.value) input.value = userInput;
      resizeInput();
      return;
    }
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
  startWork(restore);
})();
