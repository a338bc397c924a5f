// The embedded store and its secrets hold password hashes, device keys and the JWT secret: only
// the gateway's own user may read them (files 0600, the directory it creates 0700).
import { dirname } from "node:path";

const POSIX = Deno.build.os !== "windows";

/** Creates `dir` (and parents) as 0700 when missing; an existing directory is left as it is. */
export async function ensurePrivateDir(dir: string): Promise<void> {
  try {
    await Deno.stat(dir);
    return;
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  // mkdir's mode passes through the umask; say it exactly.
  if (POSIX) await Deno.chmod(dir, 0o700);
}

/** Sets `path` to 0600 when it exists (also files an earlier version created readable). */
export async function restrictFile(path: string): Promise<void> {
  if (!POSIX) return;
  try {
    await Deno.chmod(path, 0o600);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
}

/**
 * Before `Deno.openKv(path)`: the directory exists (0700 if created here) and the database file
 * exists as an empty 0600 file, which SQLite takes as a new database; its -wal and -shm files
 * are created with the database file's mode.
 */
export async function prepareKvFile(path: string): Promise<void> {
  await ensurePrivateDir(dirname(path));
  try {
    const file = await Deno.open(path, { write: true, createNew: true, mode: 0o600 });
    file.close();
  } catch (error) {
    if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
  }
  await restrictKvFiles(path);
}

/** Sets the database file and its SQLite side files to 0600. */
export async function restrictKvFiles(path: string): Promise<void> {
  for (const suffix of ["", "-wal", "-shm", "-journal"]) await restrictFile(path + suffix);
}
