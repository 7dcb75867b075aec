//! Revenue totals: exact decimals of any size, and the per-user sum that builds them.
//!
//! An event's `value` is a `rust_decimal::Decimal` (at most 28 significant digits and 28 decimal
//! places, see `event.rs`), but nothing bounds how many events a user has, so a *total* is not one:
//! `100000000000 + 0.0000000000000000000000000001` already needs 40 digits. Totals are therefore
//! [`Total`], an arbitrary-precision decimal (the `bigdecimal` crate: a `num-bigint` integer and a
//! scale), everywhere a total lives: the processor's batch, both stores, `GET /userEvents`, the console
//! and `eps status`.
//!
//! Invariants:
//! - Nothing here rounds and nothing overflows: every addition is exact, whatever the sizes. Memory
//!   per total grows with its number of digits.
//! - The text form ([`Total`]'s `Display`) is plain and normalised: no exponent, no trailing zeros
//!   after the point, no point when there is no fraction, `0` for zero (never `-0`). For every value a
//!   `Decimal` holds it is exactly `Decimal::normalize().to_string()`, so the wire format of totals
//!   that fitted before is unchanged.
//! - [`ExactSum`] keeps the hot path of the processor in 128-bit integers: a value is added to an
//!   `i128` mantissa at the largest scale seen, and only when that would overflow is the mantissa
//!   moved ("spilled") into a big decimal beside it. A sum is `mantissa / 10^scale + spilled`.
//! - [`order_key`] maps a total to text whose byte order is its numeric order, so a database can
//!   index it and list the highest totals without reading every row (SQLite's top users).

use std::fmt;
use std::str::FromStr;

use bigdecimal::num_bigint::BigInt;
use bigdecimal::BigDecimal;
use rust_decimal::Decimal;

/// An exact decimal of any size: a user's revenue, or the sum of everyone's.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Total(BigDecimal);

impl Total {
    pub fn zero() -> Total {
        Total::default()
    }

    fn from_parts(mantissa: i128, scale: u32) -> Total {
        Total(BigDecimal::new(BigInt::from(mantissa), i64::from(scale)))
    }

    /// The value as a `Decimal`, if one holds it exactly.
    pub fn to_decimal(&self) -> Option<Decimal> {
        Decimal::from_str_exact(&self.to_string()).ok()
    }

    /// Text whose byte order (memcmp, SQLite's BINARY collation) is the numeric order; see [`order_key`].
    pub fn order_key(&self) -> String {
        order_key(&self.to_string())
    }
}

impl From<Decimal> for Total {
    fn from(value: Decimal) -> Total {
        Total::from_parts(value.mantissa(), value.scale())
    }
}

impl std::ops::AddAssign<&Total> for Total {
    fn add_assign(&mut self, other: &Total) {
        self.0 += &other.0;
    }
}

impl std::ops::Add for Total {
    type Output = Total;
    fn add(mut self, other: Total) -> Total {
        self += &other;
        self
    }
}

impl std::iter::Sum for Total {
    fn sum<I: Iterator<Item = Total>>(iter: I) -> Total {
        iter.fold(Total::zero(), |a, b| a + b)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a decimal")]
pub struct ParseTotalError(String);

impl FromStr for Total {
    type Err = ParseTotalError;

    /// A decimal's text: plain (`-12.50`) as the stores hold it; an exponent is accepted too.
    fn from_str(text: &str) -> Result<Total, ParseTotalError> {
        // bigdecimal would take "+1" and "1_000"; a stored total is never written so.
        let plain = text.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'e' | b'E' | b'+'));
        if !plain || text.is_empty() || text.starts_with('+') {
            return Err(ParseTotalError(text.to_string()));
        }
        BigDecimal::from_str(text).map(Total).map_err(|_| ParseTotalError(text.to_string()))
    }
}

impl fmt::Display for Total {
    /// Plain and normalised (see the module's invariants).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mantissa, scale) = self.0.as_bigint_and_scale();
        let digits = mantissa.magnitude().to_string();
        if digits == "0" {
            return f.write_str("0");
        }
        if mantissa.sign() == bigdecimal::num_bigint::Sign::Minus {
            f.write_str("-")?;
        }
        if scale <= 0 {
            f.write_str(&digits)?;
            for _ in 0..scale.unsigned_abs() {
                f.write_str("0")?;
            }
            return Ok(());
        }
        let scale = usize::try_from(scale).unwrap_or(usize::MAX);
        let (int, frac) = if digits.len() > scale {
            (&digits[..digits.len() - scale], std::borrow::Cow::Borrowed(&digits[digits.len() - scale..]))
        } else {
            ("0", std::borrow::Cow::Owned(format!("{}{digits}", "0".repeat(scale - digits.len()))))
        };
        let frac = frac.trim_end_matches('0');
        f.write_str(int)?;
        if !frac.is_empty() {
            f.write_str(".")?;
            f.write_str(frac)?;
        }
        Ok(())
    }
}

impl serde::Serialize for Total {
    /// As its exact text, a JSON string (as `Decimal` was).
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Digits of the integer-part length in an [`order_key`]: totals with up to 10^10 - 1 integer digits.
const KEY_LENGTH_DIGITS: usize = 10;

/// The sort key of a total's plain normalised text (as [`Total`] displays it): byte order = numeric
/// order.
///
/// `2` + the integer part's digit count (10 digits, zero-padded) + the integer digits + the fraction
/// digits for a positive total; `1` for zero; for a negative one `0` + the nines' complement of the
/// same digits (larger magnitudes sort first) + `~` (above every digit, so that -1.5 sorts after -1.51
/// although its digits are a prefix). The fraction has no trailing zeros, so a shorter key that is a
/// prefix of a longer one is the smaller positive number.
pub fn order_key(plain: &str) -> String {
    let (negative, magnitude) = match plain.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, plain),
    };
    let (int, frac) = magnitude.split_once('.').unwrap_or((magnitude, ""));
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    if int.is_empty() && frac.is_empty() {
        return "1".to_string();
    }
    let mut key = String::with_capacity(2 + KEY_LENGTH_DIGITS + int.len() + frac.len());
    let length = format!("{:0width$}", int.len(), width = KEY_LENGTH_DIGITS);
    if negative {
        key.push('0');
        key.extend(length.chars().chain(int.chars()).chain(frac.chars()).map(nines_complement));
        key.push('~');
    } else {
        key.push('2');
        key.push_str(&length);
        key.push_str(int);
        key.push_str(frac);
    }
    key
}

fn nines_complement(digit: char) -> char {
    char::from(b'9' - (digit as u8 - b'0'))
}

/// A per-user sum that never rounds and never overflows: `mantissa / 10^scale + spilled`.
///
/// Adding a `Decimal` is 128-bit integer arithmetic at the largest scale seen (the processor's hot
/// path). When that would overflow (28-digit values at 28 decimal places need 10^56), the 128-bit part
/// is added to `spilled`, an arbitrary-precision decimal allocated then, and the new value starts the
/// 128-bit part afresh: the hot path stays integer arithmetic even for a user past 10^38.
#[derive(Debug, Clone, Default)]
pub struct ExactSum {
    mantissa: i128,
    scale: u32,
    spilled: Option<Box<Total>>,
}

impl ExactSum {
    pub fn of(value: Decimal) -> ExactSum {
        ExactSum { mantissa: value.mantissa(), scale: value.scale(), spilled: None }
    }

    #[inline]
    pub fn add_decimal(&mut self, value: Decimal) {
        self.add_parts(value.mantissa(), value.scale());
    }

    /// Adds another sum (merging the sums of two parts of the log).
    pub fn add(&mut self, other: ExactSum) {
        if let Some(spilled) = other.spilled {
            self.add_total(&spilled);
        }
        self.add_parts(other.mantissa, other.scale);
    }

    /// Adds a total of any size.
    pub fn add_total(&mut self, total: &Total) {
        match &mut self.spilled {
            Some(spilled) => **spilled += total,
            None => self.spilled = Some(Box::new(total.clone())),
        }
    }

    #[inline]
    fn add_parts(&mut self, mantissa: i128, scale: u32) {
        if scale == self.scale {
            if let Some(sum) = self.mantissa.checked_add(mantissa) {
                self.mantissa = sum;
                return;
            }
        } else {
            let to = self.scale.max(scale);
            let rescale = |m: i128, s: u32| m.checked_mul(10i128.checked_pow(to - s)?);
            if let Some(sum) =
                rescale(self.mantissa, self.scale).and_then(|a| rescale(mantissa, scale).and_then(|b| a.checked_add(b)))
            {
                self.mantissa = sum;
                self.scale = to;
                return;
            }
        }
        self.spill_and_restart(mantissa, scale);
    }

    /// The 128-bit part cannot take `mantissa / 10^scale`: move it into `spilled`, start again there.
    #[cold]
    fn spill_and_restart(&mut self, mantissa: i128, scale: u32) {
        if self.mantissa != 0 {
            let part = Total::from_parts(self.mantissa, self.scale);
            self.add_total(&part);
        }
        self.mantissa = mantissa;
        self.scale = scale;
    }

    /// The exact sum.
    pub fn total(self) -> Total {
        let mut total = Total::from_parts(self.mantissa, self.scale);
        if let Some(spilled) = self.spilled {
            total += &spilled;
        }
        total
    }

    /// Whether the 128-bit part was ever exceeded (for tests of the promotion).
    #[cfg(test)]
    pub(crate) fn spilled(&self) -> bool {
        self.spilled.is_some()
    }
}

/// `a + b` if the result is exact, `None` if it would overflow or need rounding.
///
/// `Decimal::checked_add` only fails on overflow: when the exact sum needs more than 28 digits it
/// silently rounds (10 + 1e-28 gives 10). Money must never be rounded, so the sum is verified: if it was
/// rounded, subtracting `a` back cannot give `b` (the subtraction of two exact values at the sum's scale
/// is itself exact).
pub fn exact_add(a: Decimal, b: Decimal) -> Option<Decimal> {
    let sum = a.checked_add(b)?;
    (sum.checked_sub(a) == Some(b)).then_some(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn total(s: &str) -> Total {
        Total::from_str(s).unwrap()
    }

    #[test]
    fn text_is_plain_normalised_and_equals_decimal_normalize_where_it_fits() {
        for s in [
            "0",
            "-0",
            "0.000",
            "1",
            "100",
            "100.00",
            "-100.50",
            "0.1",
            "-0.05",
            "12345678901234567.891",
            "0.0000000000000000000000000001",
            "79228162514264337593543950335",
            "-79228162514264337593543950335",
            "7.9228162514264337593543950335",
            "1000000000000000000000000000",
        ] {
            let d = dec(s);
            assert_eq!(Total::from(d).to_string(), d.normalize().to_string(), "{s}");
            assert_eq!(total(s).to_string(), d.normalize().to_string(), "{s}");
            assert_eq!(Total::from(d).to_decimal(), Some(d), "{s}");
        }
        assert_eq!(total("1e40").to_string(), format!("1{}", "0".repeat(40)));
        assert_eq!(total("-1.5E-30").to_string(), format!("-0.{}15", "0".repeat(29)));
        assert_eq!(total("100000000000.0000000000000000000000000001").to_decimal(), None);
        for bad in ["", "abc", "1.2.3", "+1", "1_0", " 1", "NaN"] {
            assert!(Total::from_str(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn totals_add_exactly_beyond_any_decimal() {
        let sum = total("100000000000") + total("0.0000000000000000000000000001");
        assert_eq!(sum.to_string(), "100000000000.0000000000000000000000000001");
        let big = total("9999999999999999999999999999");
        let many: Total = std::iter::repeat_n(big.clone(), 1000).sum();
        assert_eq!(many.to_string(), "9999999999999999999999999999000");
        assert_eq!((many + total("-9999999999999999999999999999000.5")).to_string(), "-0.5");
    }

    /// Expected values are written out as text, not computed with the code under test.
    #[test]
    fn exact_sum_promotes_on_overflow_and_never_rounds() {
        let sum = |values: &[&str]| {
            let mut s = ExactSum::default();
            for v in values {
                s.add_decimal(dec(v));
            }
            let spilled = s.spilled();
            (s.total().to_string(), spilled)
        };
        assert_eq!(sum(&["0.1"; 10]), ("1".to_string(), false));
        assert_eq!(sum(&["10", "-10.50", "0.25"]), ("-0.25".to_string(), false));
        // Beyond a Decimal but within 128 bits: no promotion needed.
        assert_eq!(
            sum(&["10", "0.0000000000000000000000000001"]),
            ("10.0000000000000000000000000001".to_string(), false)
        );
        // The pair: 10^11 at 28 places needs 10^39 > 2^127.
        assert_eq!(
            sum(&["100000000000", "0.0000000000000000000000000001"]),
            ("100000000000.0000000000000000000000000001".to_string(), true)
        );
        assert_eq!(
            sum(&["1000000000000000000000000000", "0.0000000000000000000000000001", "1"]),
            ("1000000000000000000000000001.0000000000000000000000000001".to_string(), true)
        );
        // Whole 28-digit numbers stay in 128 bits for 10^10 events; a 28th decimal place beside them
        // does not: the sum is promoted, and goes on exactly, up and back down.
        let nines = "9999999999999999999999999999";
        assert_eq!(sum(&[nines; 1000]), ("9999999999999999999999999999000".to_string(), false));
        let mut s = ExactSum::of(dec("0.0000000000000000000000000001"));
        for _ in 0..1000 {
            s.add_decimal(dec(nines));
        }
        assert!(s.spilled());
        assert_eq!(s.clone().total().to_string(), "9999999999999999999999999999000.0000000000000000000000000001");
        for _ in 0..999 {
            s.add_decimal(-dec(nines));
        }
        s.add_decimal(-dec("0.5"));
        assert_eq!(s.total().to_string(), "9999999999999999999999999998.5000000000000000000000000001");
    }

    #[test]
    fn a_sum_is_as_small_as_the_128_bit_one_it_replaces() {
        // The processor keeps one per user in a hash map: the spill pointer fits the padding.
        assert_eq!(std::mem::size_of::<ExactSum>(), 32);
    }

    #[test]
    fn merged_sums_equal_one_sum() {
        let values = ["100000000000", "0.0000000000000000000000000001", "-3.5", "79228162514264337593543950335"];
        let mut one = ExactSum::default();
        let (mut a, mut b) = (ExactSum::default(), ExactSum::default());
        for (i, v) in values.iter().cycle().take(40).enumerate() {
            one.add_decimal(dec(v));
            if i % 3 == 0 {
                a.add_decimal(dec(v))
            } else {
                b.add_decimal(dec(v))
            }
        }
        a.add(b);
        // Ten of each value, computed outside eps (Python's decimal at 200 digits) and written out here.
        let want = "792281625142643376935439503315.000000000000000000000000001";
        assert_eq!(one.total().to_string(), want);
        assert_eq!(a.total().to_string(), want);
    }

    #[test]
    fn order_keys_sort_like_the_numbers() {
        let texts = [
            "-100000000000000000000000000000000000000000.5",
            "-1000",
            "-999.99",
            "-1.51",
            "-1.5",
            "-1",
            "-0.5",
            "-0.05",
            "-0.0000000000000000000000000001",
            "0",
            "0.0000000000000000000000000001",
            "0.05",
            "0.5",
            "0.51",
            "1",
            "1.5",
            "1.51",
            "9",
            "10",
            "100000000000000000000",
            "100000000000000000001",
            "100000000000000000001.0000000000000000000000000001",
            "100000000000000000002",
            "1e60",
        ];
        let mut by_number: Vec<Total> = texts.iter().map(|t| total(t)).collect();
        by_number.sort();
        let mut by_key = by_number.clone();
        by_key.reverse();
        by_key.sort_by_key(Total::order_key);
        assert_eq!(by_key, by_number);
        // The listed order is already the numeric order: check it directly too (not only via Ord).
        let keys: Vec<String> = texts.iter().map(|t| total(t).order_key()).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:#?}");
        assert_eq!(order_key("-0.50"), order_key("-0.5"));
        assert_eq!(order_key("0"), "1");
    }

    #[test]
    fn exact_add_refuses_to_round_or_overflow() {
        assert_eq!(exact_add(dec("0.1"), dec("0.2")), Some(dec("0.3")));
        assert_eq!(exact_add(dec("10"), dec("-10.5")), Some(dec("-0.5")));
        assert_eq!(exact_add(dec("10"), dec("0.0000000000000000000000000001")), None);
        assert_eq!(exact_add(Decimal::MAX, dec("1")), None);
        assert_eq!(exact_add(dec("79228162514264337593543950"), dec("0.0001")), None);
    }
}
