// Drives the chat page in headless Chromium: node chat_page.js URL "msg 1" "msg 2" ...
// Types each message, waits for the reply, prints one JSON line per reply:
// {"message": ..., "reply": ..., "titles": [item titles shown]}. Exit 1 on any failure.
"use strict";
const { chromium } = require("playwright-core");

const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--no-first-run",
  "--disable-dev-shm-usage"];

(async () => {
  const [url, ...messages] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: FLAGS, headless: true,
  });
  try {
    const page = await browser.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url, { waitUntil: "load", timeout: 60000 });
    for (let n = 0; n < messages.length; n++) {
      await page.fill("#message", messages[n]);
      await page.click("#send");
      const sel = `.msg.assistant >> nth=${n}`;
      await page.waitForSelector(sel, { timeout: 120000 });
      const reply = await page.locator(sel).evaluate((el) => el.firstChild.textContent);
      const titles = await page.locator(sel).locator(".items .title").allTextContents();
      console.log(JSON.stringify({ message: messages[n], reply, titles }));
    }
    if (errors.length) throw new Error("page errors: " + errors.join("; "));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(String(e && e.stack || e)); process.exit(1); });
