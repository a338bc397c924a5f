type Labels = Record<string, string>;

interface Family {
  help: string;
  type: "counter" | "gauge" | "histogram";
  values: Map<string, number>;
  read?: () => number;
  /** Labelled series read at scrape time. */
  collect?: () => Iterable<readonly [Labels, number]>;
  /** Histograms: upper bounds, ascending, without `+Inf`. */
  buckets?: readonly number[];
  series?: Map<string, HistogramSeries>;
}

/** One labelled series of a histogram: per-bucket (not cumulative) counts, then `+Inf`. */
interface HistogramSeries {
  counts: number[];
  sum: number;
  count: number;
}

/** Default histogram buckets in seconds: 100 µs to 1 s (cache and database round trips). */
export const DEFAULT_BUCKETS: readonly number[] = [
  0.0001,
  0.00025,
  0.0005,
  0.001,
  0.0025,
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
];

/** Series keys by label name, then value, then the next label's name…: no strings built per call. */
interface KeyNode {
  next: Map<string, KeyNode>;
  key?: string;
}

const MAX_CACHED_KEYS = 10_000;
const NO_LABELS: Labels = {};

/** Counters, gauges and histograms rendered in the Prometheus text format; no I/O. */
export class Metrics {
  #families = new Map<string, Family>();
  #keys: KeyNode = { next: new Map() };
  #cached = 0;

  /** Declares a counter. */
  counter(name: string, help: string): void {
    this.#families.set(name, { help, type: "counter", values: new Map() });
  }

  /** Declares a gauge read at scrape time. */
  gauge(name: string, help: string, read: () => number): void {
    this.#families.set(name, { help, type: "gauge", values: new Map(), read });
  }

  /** Declares a gauge whose labelled series are set with {@linkcode Metrics.set}. */
  gaugeSet(name: string, help: string): void {
    this.#families.set(name, { help, type: "gauge", values: new Map() });
  }

  /** Sets a labelled series of a gauge declared with {@linkcode Metrics.gaugeSet}. */
  set(name: string, labels: Labels, value: number): void {
    const family = this.#families.get(name);
    if (!family || family.type !== "gauge" || family.read) {
      throw new RangeError(`Unknown settable gauge "${name}"`);
    }
    family.values.set(this.#keyOf(labels), value);
  }

  /** Declares a counter kept elsewhere and read at scrape time (it only ever grows). */
  counterOf(name: string, help: string, read: () => number): void {
    this.#families.set(name, { help, type: "counter", values: new Map(), read });
  }

  /**
   * Declares a family whose labelled series are read at scrape time from counters kept by the
   * component itself: nothing on its hot path but its own `+= 1`.
   */
  collect(
    name: string,
    help: string,
    type: "counter" | "gauge",
    read: () => Iterable<readonly [Labels, number]>,
  ): void {
    this.#families.set(name, { help, type, values: new Map(), collect: read });
  }

  /** Declares a histogram with upper bounds `buckets` (ascending; `+Inf` is implied). */
  histogram(name: string, help: string, buckets: readonly number[] = DEFAULT_BUCKETS): void {
    for (let i = 0; i < buckets.length; i++) {
      if (!Number.isFinite(buckets[i]) || (i > 0 && buckets[i] <= buckets[i - 1])) {
        throw new RangeError(`Histogram "${name}" needs finite ascending buckets`);
      }
    }
    this.#families.set(name, {
      help,
      type: "histogram",
      values: new Map(),
      buckets: [...buckets],
      series: new Map(),
    });
  }

  /** Whether a metric of that name is declared. */
  has(name: string): boolean {
    return this.#families.has(name);
  }

  /** Adds `by` to a counter's labelled series. */
  inc(name: string, labels: Labels = NO_LABELS, by = 1): void {
    const family = this.#families.get(name);
    if (!family || family.type === "histogram") throw new RangeError(`Unknown counter "${name}"`);
    const key = this.#keyOf(labels);
    family.values.set(key, (family.values.get(key) ?? 0) + by);
  }

  /** Records one observation (e.g. a duration in seconds) in a histogram's labelled series. */
  observe(name: string, labels: Labels, value: number): void {
    const family = this.#families.get(name);
    if (!family?.series || !family.buckets) throw new RangeError(`Unknown histogram "${name}"`);
    const key = this.#keyOf(labels);
    let series = family.series.get(key);
    if (series === undefined) {
      series = { counts: new Array(family.buckets.length + 1).fill(0), sum: 0, count: 0 };
      family.series.set(key, series);
    }
    let i = 0;
    while (i < family.buckets.length && value > family.buckets[i]) i++;
    series.counts[i]++;
    series.sum += value;
    series.count++;
  }

  /** The escaped series key of a label set; called per message, so built once per label set. */
  #keyOf(labels: Labels): string {
    let node: KeyNode | undefined = this.#keys;
    for (const k in labels) {
      node = node.next.get(k)?.next.get(labels[k]);
      if (node === undefined) break;
    }
    if (node?.key !== undefined) return node.key;
    const key = Object.entries(labels).map(([k, v]) => `${k}="${v.replace(/["\\\n]/g, "_")}"`)
      .join(",");
    if (this.#cached < MAX_CACHED_KEYS) {
      this.#cached++;
      let at = this.#keys;
      for (const k in labels) at = child(child(at, k), labels[k]);
      at.key = key;
    }
    return key;
  }

  /** The exposition text. */
  render(): string {
    const lines: string[] = [];
    for (const [name, f] of this.#families) {
      lines.push(`# HELP ${name} ${escapeHelp(f.help)}`, `# TYPE ${name} ${f.type}`);
      if (f.read) lines.push(`${name} ${formatValue(f.read())}`);
      if (f.collect) {
        for (const [labels, value] of f.collect()) {
          const key = this.#keyOf(labels);
          lines.push(`${name}${key ? `{${key}}` : ""} ${formatValue(value)}`);
        }
      }
      for (const [key, value] of f.values) {
        lines.push(`${name}${key ? `{${key}}` : ""} ${formatValue(value)}`);
      }
      if (f.series && f.buckets) renderHistogram(lines, name, f.buckets, f.series);
    }
    return lines.join("\n") + "\n";
  }
}

/** Cumulative `_bucket` lines up to `+Inf`, then `_sum` and `_count`, per series. */
function renderHistogram(
  lines: string[],
  name: string,
  buckets: readonly number[],
  series: Map<string, HistogramSeries>,
): void {
  for (const [key, s] of series) {
    const at = key ? `${key},` : "";
    let cumulative = 0;
    for (let i = 0; i <= buckets.length; i++) {
      cumulative += s.counts[i];
      const le = i < buckets.length ? String(buckets[i]) : "+Inf";
      lines.push(`${name}_bucket{${at}le="${le}"} ${cumulative}`);
    }
    const labels = key ? `{${key}}` : "";
    lines.push(`${name}_sum${labels} ${s.sum}`, `${name}_count${labels} ${s.count}`);
  }
}

/** HELP text as the exposition format wants it: backslashes and newlines escaped. */
function escapeHelp(help: string): string {
  return help.replace(/\\/g, "\\\\").replace(/\n/g, "\\n");
}

/** A sample value in the exposition format (`+Inf`, `-Inf`, `NaN` spelled as Prometheus does). */
function formatValue(value: number): string {
  if (Number.isFinite(value)) return String(value);
  if (Number.isNaN(value)) return "NaN";
  return value > 0 ? "+Inf" : "-Inf";
}

function child(node: KeyNode, name: string): KeyNode {
  let next = node.next.get(name);
  if (next === undefined) node.next.set(name, next = { next: new Map() });
  return next;
}
