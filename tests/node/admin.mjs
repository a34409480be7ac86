// Drives Owlery's admin dashboard in headless Chromium (playwright-core, the machine's own
// Chromium): signs in, waits for the plugins and a chart with data, pauses one plugin from
// its button (accepting the confirmation), takes a screenshot, and prints one JSON line.
//
//   node admin.mjs BASE_URL TOKEN PLUGIN_TO_PAUSE SCREENSHOT_PATH
import { existsSync } from 'node:fs';
import { chromium } from 'playwright-core';

const [base, token, toPause, screenshot] = process.argv.slice(2);
if (!screenshot) {
  console.error('usage: node admin.mjs BASE_URL TOKEN PLUGIN_TO_PAUSE SCREENSHOT_PATH');
  process.exit(2);
}
const executablePath = ['/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/bin/google-chrome'].find(existsSync);
if (!executablePath) {
  console.error('no Chromium found (./test.sh installs it)');
  process.exit(1);
}

const STEP = 30_000;
async function step(what, action) {
  try {
    return await action();
  } catch (e) {
    throw new Error(`${what}: ${e.message}`);
  }
}

const browser = await chromium.launch({
  executablePath,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let code = 0;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(STEP);
  const problems = [];
  page.on('pageerror', (e) => problems.push(String(e)));
  page.on('dialog', (dialog) => dialog.accept());

  await step('open the page', () => page.goto(`${base}/admin`));
  await step('sign in', async () => {
    await page.fill('#token', token);
    await page.click('#sign-in');
  });
  const names = await step('three plugins shown', async () => {
    await page.waitForFunction(() => document.querySelectorAll('section.plugin').length === 3);
    return page.$$eval('section.plugin', (cards) => cards.map((c) => c.dataset.plugin));
  });
  await step('the token stays out of the URL and in session storage', async () => {
    if (page.url().includes(token)) throw new Error(`the URL holds the token: ${page.url()}`);
    const kept = await page.evaluate(() => sessionStorage.getItem('owlery-admin-token'));
    if (kept !== token) throw new Error(`session storage holds ${JSON.stringify(kept)}`);
    const local = await page.evaluate(() => localStorage.length);
    if (local !== 0) throw new Error('something was put in local storage');
  });
  const peakRate = await step('a chart draws data as events flow', async () => {
    const handle = await page.waitForFunction(() => {
      for (const img of document.querySelectorAll('img.chart')) {
        if (Number(img.dataset.peakRate) > 0 && Number(img.dataset.samples) > 1 && img.complete && img.naturalWidth > 0) {
          return Number(img.dataset.peakRate);
        }
      }
      return false;
    });
    return handle.jsonValue();
  });
  await step(`pause ${toPause} from its button`, async () => {
    await page.click(`button[data-action="pause"][data-plugin="${toPause}"]`);
    await page.waitForFunction(
      (name) => document.querySelector(`section.plugin[data-plugin="${name}"] .state`)?.textContent === 'paused',
      toPause,
    );
  });
  await step('screenshot', () => page.screenshot({ path: screenshot, fullPage: true }));
  if (problems.length) throw new Error(`the page threw: ${problems.join('; ')}`);
  console.log(JSON.stringify({ plugins: names, peakRate, paused: toPause }));
} catch (e) {
  console.error(e.message);
  code = 1;
} finally {
  await browser.close();
}
process.exit(code);
