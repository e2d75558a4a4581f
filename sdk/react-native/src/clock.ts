/** Streaming decode speed: tokens after the first over the time since the first. */
export class TokenClock {
  private first: number | undefined;
  private count = 0;

  constructor(private readonly now: () => number = Date.now) {}

  tick(): number {
    const t = this.now();
    this.count += 1;
    if (this.first === undefined) this.first = t;
    const elapsed = (t - this.first) / 1000;
    return this.count > 1 && elapsed > 0 ? (this.count - 1) / elapsed : 0;
  }

  get tokens(): number {
    return this.count;
  }

  get firstAt(): number | undefined {
    return this.first;
  }
}
