// A small embedded list of passwords seen again and again in breach corpora (those of 12 or more
// characters, since shorter ones fail the length rule anyway), plus the sequences they are built
// from. Enough to refuse the obvious; a breach-corpus lookup would need a network or a large file.

const COMMON = new Set([
  "123456789012",
  "1234567890123",
  "12345678901234",
  "123456789123",
  "123123123123",
  "111111111111",
  "000000000000",
  "123456123456",
  "qwertyuiop12",
  "qwertyuiop123",
  "qwerty123456",
  "qwerty12345678",
  "1q2w3e4r5t6y",
  "1qaz2wsx3edc",
  "zaq12wsxcde3",
  "q1w2e3r4t5y6",
  "password1234",
  "password12345",
  "password123456",
  "passwordpassword",
  "password1234567",
  "p@ssw0rd1234",
  "p@ssword1234",
  "passw0rd1234",
  "iloveyou1234",
  "iloveyouforever",
  "letmein12345",
  "welcome12345",
  "welcome123456",
  "administrator",
  "administrator1",
  "admin1234567",
  "admin123456789",
  "adminadmin123",
  "changeme1234",
  "changemenow!",
  "trustno1trustno1",
  "football1234",
  "baseball1234",
  "basketball12",
  "superman1234",
  "starwars1234",
  "monkey123456",
  "dragon123456",
  "sunshine1234",
  "princess1234",
  "qazwsxedcrfv",
  "asdfghjkl123",
  "zxcvbnm12345",
  "abcdefghijkl",
  "abcd12345678",
  "abc123456789",
  "michael12345",
  "jennifer1234",
  "computer1234",
  "internet1234",
  "whatever1234",
  "mypassword123",
  "secretpassword",
  "correcthorsebatterystaple",
  "gridtokenx123",
  "gridtokenx1234",
]);

// Keyboard rows and digit runs, forwards and backwards, repeated so wrapped runs match.
const SEQUENCES = [
  "1234567890".repeat(4),
  "0987654321".repeat(4),
  "abcdefghijklmnopqrstuvwxyz".repeat(2),
  "qwertyuiopasdfghjklzxcvbnm".repeat(2),
  "mnbvcxzlkjhgfdsapoiuytrewq".repeat(2),
  "qazwsxedcrfvtgbyhnujmikolp".repeat(2),
];

// Words the list above is built from: a password whose letters are only these, repeated, is
// as weak as the list's entries ("passwordpassword1", "Monkey!Monkey!").
const WORDS = [
  "password",
  "passw",
  "pass",
  "qwerty",
  "qwertyuiop",
  "asdf",
  "asdfghjkl",
  "zxcvbnm",
  "qazwsx",
  "iloveyou",
  "love",
  "letmein",
  "welcome",
  "admin",
  "administrator",
  "changeme",
  "trustno",
  "football",
  "baseball",
  "basketball",
  "superman",
  "starwars",
  "monkey",
  "dragon",
  "sunshine",
  "princess",
  "michael",
  "jennifer",
  "computer",
  "internet",
  "whatever",
  "secret",
  "master",
  "hello",
  "shadow",
  "abc",
  "abcd",
  "login",
  "user",
  "test",
  "guest",
  "root",
  "default",
];
/** The product's own name, which a password of its users must not contain. */
export const PRODUCT_NAME = "gridtokenx";

// Letters-only forms of the list's entries ("p@ssw0rd1234" → "psswrd").
const COMMON_CORES = new Set([...COMMON].map(lettersOnly).filter((c) => c.length >= 4));
const WORD_REPEAT = new RegExp(`^(${WORDS.join("|")})\\1*$`);

/** The letters of `text`, lower-cased, without digits, spaces or symbols. */
export function lettersOnly(text: string): string {
  return text.toLowerCase().replace(/[^\p{L}]/gu, "");
}

/** Whether `password` is on the embedded list or is one keyboard or digit run (case ignored). */
export function isCommonPassword(password: string): boolean {
  const folded = password.toLowerCase();
  if (COMMON.has(folded)) return true;
  if (SEQUENCES.some((run) => run.includes(folded))) return true;
  // Digits and symbols around a common core do not make it strong: "Password!2026".
  const core = lettersOnly(password);
  return core.length > 0 && (COMMON_CORES.has(core) || WORD_REPEAT.test(core));
}

/**
 * How many characters of `password` lie in keyboard or digit runs of 4 or more (forwards or
 * backwards, case ignored), taking the longest run at each position.
 */
export function runCoverage(password: string): number {
  const folded = password.toLowerCase();
  let covered = 0;
  for (let i = 0; i < folded.length;) {
    let longest = 0;
    for (let end = folded.length; end - i >= 4 && end - i > longest; end--) {
      const part = folded.slice(i, end);
      if (SEQUENCES.some((run) => run.includes(part))) longest = end - i;
    }
    if (longest >= 4) {
      covered += longest;
      i += longest;
    } else {
      i++;
    }
  }
  return covered;
}
