// Chat page: POST /api/chat with the session id, render the reply and its items.
(function () {
  "use strict";
  let session = null;
  const log = document.getElementById("log");
  const form = document.getElementById("form");
  const input = document.getElementById("message");
  const status = document.getElementById("status");

  function add(cls, text) {
    const div = document.createElement("div");
    div.className = "msg " + cls;
    div.textContent = text;
    log.appendChild(div);
    return div;
  }

  function render(data) {
    const div = add("assistant", data.reply);
    (data.tool_calls || []).forEach(function (c) {
      const t = document.createElement("div");
      t.className = "tool";
      t.textContent = "tool " + (c.call.name || "?") + " (" + c.by + ")" +
        (c.error ? ": " + c.error : "");
      div.appendChild(t);
    });
    const shown = (data.items || []).concat((data.mentioned || []).filter(function (m) {
      return !(data.items || []).some(function (it) { return it.id === m.id; });
    }));
    if (shown.length) {
      const ul = document.createElement("ul");
      ul.className = "items";
      shown.forEach(function (it) {
        const li = document.createElement("li");
        li.className = "item";
        li.dataset.id = it.id;
        const title = document.createElement("span");
        title.className = "title";
        title.textContent = it.title;
        li.appendChild(title);
        if (it.text) li.appendChild(document.createTextNode(" — " + it.text));
        ul.appendChild(li);
      });
      div.appendChild(ul);
    }
  }

  form.addEventListener("submit", async function (ev) {
    ev.preventDefault();
    const message = input.value.trim();
    if (!message) return;
    add("person", message);
    input.value = "";
    status.textContent = "thinking…";
    try {
      const body = { message: message };
      if (session) body.session = session;
      const res = await fetch("/api/chat", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body)
      });
      const data = await res.json();
      if (!res.ok) throw new Error(data.error || res.statusText);
      session = data.session;
      render(data);
      status.textContent = "";
    } catch (e) {
      add("assistant error", "Error: " + e.message);
      status.textContent = "";
    }
  });
})();
