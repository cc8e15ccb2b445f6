// Bundle src/main.js and its npm packages into dist/app.js; copy the page and its style.
// Run with `npm run build --prefix examples/web` (after `npm ci --prefix examples/web`).
import { build } from 'esbuild'
import { copyFile, mkdir, rm } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const dist = join(here, 'dist')

await rm(dist, { recursive: true, force: true })
await mkdir(dist, { recursive: true })
await build({
  entryPoints: [join(here, 'src', 'main.js')],
  outfile: join(dist, 'app.js'),
  bundle: true,
  format: 'iife',
  platform: 'browser',
  target: ['es2020'],
  minify: true,
  sourcemap: true,
  legalComments: 'linked',
  logLevel: 'warning'
})
for (const file of ['index.html', 'style.css']) {
  await copyFile(join(here, 'src', file), join(dist, file))
}
console.log(`built ${dist}`)
