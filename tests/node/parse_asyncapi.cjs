// Parses an AsyncAPI document with the official parser and prints, as JSON, its diagnostics and the
// addresses of its channels (tests/test_asyncapi.py). Usage: node parse_asyncapi.cjs FILE
const fs = require("fs");
const { Parser } = require("@asyncapi/parser");

(async () => {
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(process.argv[2], "utf8"));
  const severities = ["error", "warning", "information", "hint"];
  const out = {
    diagnostics: diagnostics.map((d) => ({
      severity: severities[d.severity] ?? String(d.severity),
      code: d.code,
      message: d.message,
      path: d.path.join("/"),
    })),
    channels: document ? document.channels().all().map((c) => c.address()) : null,
  };
  process.stdout.write(JSON.stringify(out));
})().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err));
  process.exit(2);
});
